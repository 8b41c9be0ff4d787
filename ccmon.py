#!/usr/bin/env python3
"""ccmon - watch what Claude Code costs.

One module, read top to bottom. Its sections, each using only the sections above it
(storage never sees gRPC, the UI never sees SQLite):
  Domain: time, money, numbers, usage totals, models
  Values: what the store reads, the wire carries and the screens show
  Blocks and plans: 5-hour windows, limits, projections
  Configuration: the settings, files, flags, validation
  Storage: schema, migrations, opening a database
  Storage: the single writer
  Storage: reads
  OTLP ingestion: decode records, validate values
  OTLP/HTTP receiver: POST /v1/logs, /v1/metrics, /v1/traces
  Wire: ccmon.v1 messages to and from domain values
  Query service: ccmon.v1.QueryService over the store
  Server: listeners, authentication, TLS, retention, shutdown
  Client: a small QueryService client for the monitor, reports and quick query
  Figures: limits, projections and snapshots from the server's answers
  Text: figures, names and tables, shared by quick query, reports and the monitor
  Quick query: --format and --json for status bars
  Status line: ccmon statusline, for Claude Code's settings
  Reports: ccmon report daily|weekly|monthly|session|model|blocks|project|limits
  Web dashboard: GET / and /api/ on the HTTP listener
  Prometheus metrics: GET /metrics on the HTTP listener
  Import: ccmon import, Claude Code's transcripts and other agents' histories
  Local server: started on demand, detached, following the transcripts
  Setup: ccmon setup, agents' settings pointed at ccmon
  Doctor: ccmon doctor, the chain from Claude Code to the monitor checked link by link
  View model and pure render functions
  Curses loop: polling thread, keys, drawing
  CLI: arguments and entry point
"""
from __future__ import annotations

import argparse
import base64
import bisect
import calendar
import collections
import contextlib
import ctypes
import dataclasses
import datetime as dt
import decimal
import errno
import fractions
import functools
import hashlib
import hmac
import http.client
import inspect
import io
import ipaddress
import json
import logging
import marshal
import math
import multiprocessing.connection
import operator
import os
import queue
import re
import select
import shlex
import signal
import socket
import sqlite3
import ssl
import stat
import struct
import sys
import threading
import time
import textwrap
import tomllib
import weakref
import zlib
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import parse_qs, unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# gRPC's C core logs its own lines (bind failures, TLS handshakes) to the terminal; ccmon reports every
# failure in one line of its own. GRPC_VERBOSITY set by the user still wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
try:  # the dependencies (requirements.txt); run from source without them, ccmon says so in one line
    import grpc  # noqa: E402  (after GRPC_VERBOSITY, which it reads when imported)
    from google.protobuf import any_pb2, duration_pb2, json_format, timestamp_pb2
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    import ccmon_pb2
    import ccmon_pb2_grpc
except ModuleNotFoundError as missing:
    if __name__ != "__main__" or (missing.name or "").startswith("ccmon"):  # imported, or a file of ccmon's own
        raise
    sys.exit(f"ccmon: missing Python package '{missing.name}': run the single-file ccmon.pyz, or install the "
             "dependencies with 'pip install -r requirements.txt'")

VERSION = "0.1.0"
log = logging.getLogger("ccmon")


# ---------------------------------------------------------------- Domain: time, money, numbers, usage totals, models

NANOS_PER_USD = 1_000_000_000
MAX_TIMESTAMP_MS = 253402300799999  # 9999-12-31T23:59:59.999Z, the last instant datetime can show
BUCKET_MS = 15 * 60 * 1000  # rollup granularity: every timezone offset is a multiple of 15 minutes
DAY_MS = 86400_000          # second rollup level, UTC days: a year of history is a few hundred rows
HOUR_MS = 3600_000
BLOCK_MS = 5 * HOUR_MS      # Claude subscriptions meter usage in 5-hour windows


def now_ms() -> int:
    return int(time.time() * 1000)


def ms_from_datetime(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1000)


def zone_or_none(name: str) -> ZoneInfo | None:
    """The IANA zone, or None for anything that is not one (including paths zoneinfo trips over)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def day_bounds(zone: ZoneInfo, end_ms: int, days: int) -> list[tuple[str, int, int]]:
    """The last `days` calendar days in `zone` up to the one holding end_ms, newest first,
    as (YYYY-MM-DD, start_ms, end_ms); DST days are 23 or 25 hours long."""
    today = dt.datetime.fromtimestamp(end_ms / 1000, zone).date()
    bounds = []
    for back in range(days):
        day = today - dt.timedelta(days=back)
        start = dt.datetime.combine(day, dt.time(), zone)
        stop = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), zone)
        bounds.append((day.isoformat(), ms_from_datetime(start), ms_from_datetime(stop)))
    return bounds


SERIES_BUCKETS = ("hour", "day", "week")  # a series' bucket sizes; weeks start on Monday


def bucket_floor(zone: ZoneInfo, bucket: str, ms: int) -> int:
    """The start of the local hour, day or week (from Monday) holding `ms`. (A local hour starts where the clock
    shows a whole hour: at :30 UTC in India. A day starts at local midnight, or where a DST change skips it.)"""
    moment = dt.datetime.fromtimestamp(ms / 1000, zone)
    if bucket == "hour":
        while True:  # again from there when the clock was set back by half an hour in between (Lord Howe)
            floor = ms - (ms + int(moment.utcoffset().total_seconds()) * 1000) % HOUR_MS
            if floor == ms:
                return ms
            ms, moment = floor, dt.datetime.fromtimestamp(floor / 1000, zone)
    day = moment.date() - dt.timedelta(days=moment.weekday() if bucket == "week" else 0)
    return ms_from_datetime(dt.datetime.combine(day, dt.time(), zone))


def bucket_starts(zone: ZoneInfo, bucket: str, start_ms: int, end_ms: int, most: int) -> list[int] | None:
    """The starts of the local hours, days or weeks overlapping [start_ms, end_ms), oldest first, and the end of
    the last: len - 1 buckets. None when there would be more than `most`. Raises OverflowError or ValueError
    for buckets past what dates can show (year 9999)."""
    starts = [bucket_floor(zone, bucket, start_ms)]
    step = {"hour": HOUR_MS, "day": DAY_MS, "week": 7 * DAY_MS}[bucket]
    while starts[-1] < end_ms:
        if len(starts) > most:
            return None
        # A step's length (and 3 hours more for days: they last 23 to 25) lands in the next bucket, floored on its
        # start; an hour lasts 30 to 90 minutes where DST moves the clock by 30 (Lord Howe).
        after = starts[-1] + step + (3 * HOUR_MS if bucket != "hour" else 0)
        while (following := bucket_floor(zone, bucket, after)) <= starts[-1]:
            after += BUCKET_MS
        starts.append(following)
    return starts


def parse_iso_ms(text: Any) -> int | None:
    """RFC 3339 / ISO 8601 -> ms since the epoch; None when absent or unreadable."""
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    ms = ms_from_datetime(moment)
    return ms if 0 <= ms <= MAX_TIMESTAMP_MS else None


def iso_from_ms(ms: int) -> str:
    """ms since the epoch -> '2026-03-01T10:00:00.000Z', exactly (no float rounding)."""
    moment = dt.datetime.fromtimestamp(ms // 1000, dt.timezone.utc).replace(microsecond=ms % 1000 * 1000)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_premium(model: str) -> bool:
    """Haiku models are 'base'; every other model (Sonnet, Opus, ...) is 'premium'."""
    return "haiku" not in model.lower()


def model_family(model: str) -> str:
    """Weekly caps are split by family: Opus and Sonnet (Haiku is not premium)."""
    name = model.lower()
    return "opus" if "opus" in name else "sonnet" if "sonnet" in name else "haiku" if "haiku" in name else "other"


@dataclasses.dataclass(frozen=True)
class Usage:
    """Totals over a set of API requests. Cost is kept in integer nano-USD so sums are exact."""
    requests: int = 0
    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_creation: int = 0
    cost_nanos: int = 0
    duration_ms: int = 0
    ttft_ms: int = 0        # sum over the requests that reported a time to first token
    ttft_count: int = 0

    @property
    def limited(self) -> int:
        return self.input + self.output

    @property
    def cache(self) -> int:
        return self.cache_read + self.cache_creation

    @property
    def total(self) -> int:
        return self.limited + self.cache

    @property
    def cost_usd(self) -> float:
        return self.cost_nanos / NANOS_PER_USD

    # Field by field, in order: dataclasses.astuple deep-copies, ten times slower (a year of days from the
    # server is 366 points, each taken apart by subtraction).
    def __add__(self, other: Usage) -> Usage:
        return Usage(*map(operator.add, vars(self).values(), vars(other).values()))

    def __sub__(self, other: Usage) -> Usage:
        return Usage(*map(operator.sub, vars(self).values(), vars(other).values()))


@dataclasses.dataclass(frozen=True)
class Split:
    """Claude Code's usage split into base (Haiku) and premium (everything else), and the other agents' (Gemini
    CLI's, Codex's, Qwen Code's models), which no Claude plan or limit counts."""
    base: Usage = Usage()
    premium: Usage = Usage()
    other: Usage = Usage()

    @property
    def total(self) -> Usage:
        return self.base + self.premium + self.other

    @property
    def claude(self) -> Usage:
        """Claude Code's usage alone."""
        return self.base + self.premium

    def __add__(self, more: Split) -> Split:
        return Split(self.base + more.base, self.premium + more.premium, self.other + more.other)

    @classmethod
    def from_models(cls, by_model: dict[str, Usage], others: frozenset[str] = frozenset()) -> Split:
        """`others`: the names of other agents' models."""
        base, premium, other = Usage(), Usage(), Usage()
        for model, usage in by_model.items():
            if model in others:
                other += usage
            elif is_premium(model):
                premium += usage
            else:
                base += usage
        return cls(base, premium, other)


SPLIT_SIDES = tuple(field.name for field in dataclasses.fields(Split))  # base, premium, other: Split's order


class BadValue(ValueError):
    """An attribute that cannot be read as the number it must be."""


MAX_COUNT = 10 ** 12           # tokens or milliseconds in one record; sums of millions of them stay in int64
COUNT_DIGITS = 12              # digits below MAX_COUNT
MAX_USD = 10 ** 6              # dollars in one record


def exact_number(value: Any, key: str) -> decimal.Decimal | int:
    """An int as it is, or a double or an ASCII numeric string as an exact Decimal; BadValue otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadValue(f"{key}={value!r} is not a number")
    if isinstance(value, int):
        return value
    text = value.strip() if isinstance(value, str) else repr(value)  # repr: a double's shortest exact decimal
    if not text.isascii():
        raise BadValue(f"{key}={value!r} is not a number")
    try:
        exact = decimal.Decimal(text)
    except decimal.InvalidOperation:
        raise BadValue(f"{key}={value!r} is not a number") from None
    if not exact.is_finite():
        raise BadValue(f"{key}={value!r} is not a finite number")
    if exact.adjusted() > 18:  # before any arithmetic: '1e1000000' must not cost seconds of CPU
        raise BadValue(f"{key}={value!r} is too large")
    return exact


def parse_count(value: Any, key: str) -> int:
    """A non-negative whole number from an int, an integral double or a numeric string."""
    if type(value) is int and 0 <= value < MAX_COUNT:
        return value  # the common cases first: an int, or digits (Claude Code sends its counts as text)
    if type(value) is str and len(value) <= COUNT_DIGITS and value.isdigit() and value.isascii():
        return int(value)
    exact = exact_number(value, key)
    if exact != int(exact):
        raise BadValue(f"{key}={value!r} is not a whole number")
    if exact < 0:
        raise BadValue(f"{key}={value!r} is negative")
    if exact >= MAX_COUNT:
        raise BadValue(f"{key}={value!r} is too large")
    return int(exact)


# A plain decimal of dollars below MAX_USD with at most nano-dollar digits, as Claude Code sends its cost_usd (text,
# or a double as its shortest decimal): exact in whole nano-dollars without Decimal arithmetic.
PLAIN_USD = re.compile(r"([0-9]{1,6})(?:\.([0-9]{1,9}))?")


def parse_usd_nanos(value: Any, key: str) -> int:
    """A non-negative USD amount, as integer nano-USD, from a double, an int or a numeric string."""
    plain = PLAIN_USD.fullmatch(value if type(value) is str else repr(value) if type(value) is float else "")
    if plain:
        whole, fraction = plain.groups()
        return int(whole) * NANOS_PER_USD + int((fraction or "0").ljust(9, "0"))
    exact = exact_number(value, key)
    if exact < 0:
        raise BadValue(f"{key}={value!r} is negative")
    if exact >= MAX_USD:
        raise BadValue(f"{key}={value!r} is too large")
    return int((decimal.Decimal(exact) * NANOS_PER_USD).to_integral_value(decimal.ROUND_HALF_EVEN))


USER_KEYS = ("user.email", "user.account_uuid", "user.id")  # the first present names the user


def user_name(attrs: dict, resource: dict) -> str:
    """Who sent a record, for per-user figures on a team server: the most readable name either the record or
    its resource (where OTEL_RESOURCE_ATTRIBUTES puts them) has: user.email, else user.account_uuid, else
    user.id (Claude Code puts a hashed user.id on every event), else ''."""
    for key in USER_KEYS:
        for found in (attrs.get(key), resource.get(key)):
            if found:
                return str(found)
    return ""


# The coding agents whose telemetry ccmon receives, by the name stored with each request (see docs/agents.md).
CLAUDE_CODE, GEMINI_CLI, CODEX, QWEN_CODE = "claude-code", "gemini-cli", "codex", "qwen-code"
AGENTS = (CLAUDE_CODE, GEMINI_CLI, CODEX, QWEN_CODE)


def agent_names(agent: str) -> tuple[str, str]:
    """An agent's name whole, or its first word: claude-code, claude."""
    return agent, agent.split("-")[0]


def unknown_agent(name: str) -> str:
    """What is said of an agent name ccmon does not know."""
    return f"unknown agent {name[:100]!r} (known: {', '.join(AGENTS)})"

LIMITS_OF = {CLAUDE_CODE: "Claude", GEMINI_CLI: "Gemini", CODEX: "Codex", QWEN_CODE: "Qwen"}  # whose plan's limits
# Whose local history names no id its telemetry names for the same call (Gemini CLI's chat messages, Codex's
# rollouts; Qwen Code's embed the telemetry's response_id): within a session their telemetry wins over their
# history, as it has calls the history lacks (Gemini's router); see docs/import.md.
JOINED_BY_SESSION = frozenset((GEMINI_CLI, CODEX))


@dataclasses.dataclass(frozen=True)
class LimitWindow:
    """One window of Claude's own rate limits: how much of it is used and when it starts afresh."""
    percent: float                 # 0-100
    resets_ms: int
    used_usd: float | None = None  # spend limits behind a Claude gateway
    limit_usd: float | None = None
    period: str = ""


@dataclasses.dataclass(frozen=True)
class LimitReading:
    """What Claude Code handed its status line at one moment: the session, its project, Claude's own limits."""
    session_id: str
    read_ms: int
    project: str = ""
    model: str = ""
    context_percent: float | None = None
    five_hour: LimitWindow | None = None
    seven_day: LimitWindow | None = None
    spend_limit: LimitWindow | None = None
    version: str = ""
    user: str = ""                 # the session's user, once its events have arrived
    agent: str = CLAUDE_CODE       # whose limits: Claude's (the status line's), or another agent's plan's


def live_window(window: LimitWindow | None, now: int) -> LimitWindow | None:
    """A window of Claude's while it has not reset; its share is Claude's figure when it was read."""
    return window if window is not None and window.resets_ms > now else None


@dataclasses.dataclass(frozen=True)
class ClaudeLimits:
    """What Claude itself says about a user's limits: the newest reading of each window that has not reset
    (its share as read then), and what a full window holds by calibration (None without usable readings)."""
    five_hour: LimitReading | None = None
    seven_day: LimitReading | None = None
    five_hour_capacity: int | None = None   # premium input + output tokens of a full 5-hour window
    five_hour_readings: int = 0             # how many windows the capacity was calibrated from
    seven_day_capacity: int | None = None
    seven_day_readings: int = 0
    agents: tuple[LimitReading, ...] = ()   # other agents' newest readings of their own plans' limits (Codex's)
    user: str | None = None                 # whose usage the windows and capacities count (see GetLimits); None:
                                            # everyone's
    team: bool = False                      # asked for everyone, on a team's server (see GetLimits)

    def window(self, name: str, now: int) -> LimitWindow | None:
        """The five_hour or seven_day window as last read, while it has not reset at `now`."""
        reading = getattr(self, name)
        return live_window(getattr(reading, name), now) if reading is not None else None

    def read_ms(self, name: str) -> int | None:
        reading = getattr(self, name)
        return reading.read_ms if reading is not None else None


def agent_windows(agent: str, user: str, limits: ClaudeLimits, now: int) -> LimitReading:
    """Another agent's live windows of a user's (see Reader.live_limits) as one reading: each window as last read,
    read at the newer of the two readings."""
    read = [reading for reading in (limits.five_hour, limits.seven_day) if reading is not None]
    newest = max(read, key=lambda reading: reading.read_ms)
    return LimitReading(newest.session_id, newest.read_ms, five_hour=limits.window("five_hour", now),
                        seven_day=limits.window("seven_day", now), user=user, agent=agent)


@dataclasses.dataclass(frozen=True)
class Price:
    """USD per million tokens of one model, exact: input, output, cache read, 5-minute and 1-hour cache writes;
    `long_prompt` (prompt tokens above which, and the price then, which may have a long_prompt of its own) where the
    model charges more for long prompts."""
    input: decimal.Decimal
    output: decimal.Decimal
    cache_read: decimal.Decimal
    cache_write_5m: decimal.Decimal
    cache_write_1h: decimal.Decimal
    long_prompt: tuple[int, "Price"] | None = None


def price(input: str, output: str, cache_read: str, cache_write_5m: str, cache_write_1h: str,
          long_prompt: tuple[int, Price] | None = None) -> Price:
    return Price(*(decimal.Decimal(v) for v in (input, output, cache_read, cache_write_5m, cache_write_1h)),
                 long_prompt)


# Claude Code 2.1.328's own model catalog (the prices it computes cost_usd with), per million tokens.
PRICE_TIERS = {
    "haiku_35": price("0.8", "4", "0.08", "1", "1.6"),
    "haiku_45": price("1", "5", "0.1", "1.25", "2"),
    "haiku_55": price("0.1", "0.5", "0.01", "0.125", "0.2", (100_000, price("0.5", "2.5", "0.05", "0.625", "1"))),
    "3_15": price("3", "15", "0.3", "3.75", "6"),
    "2_10": price("2", "10", "0.2", "2.5", "4"),
    "2_10_read_0_10": price("2", "10", "0.1", "2.5", "4"),
    "15_75": price("15", "75", "1.5", "18.75", "30"),
    "5_25": price("5", "25", "0.5", "6.25", "10"),
    "4_20_read_0_20": price("4", "20", "0.2", "5", "8"),
    "10_50": price("10", "50", "1", "12.5", "20"),
    "10_50_read_0_25": price("10", "50", "0.25", "12.5", "20"),
    "8_40_read_0_20": price("8", "40", "0.2", "10", "16"),
}
PRICES: dict[str, Price] = {**{model: PRICE_TIERS[tier] for model, tier in (
    ("claude-3-haiku", "haiku_35"), ("claude-3-5-haiku", "haiku_35"), ("claude-haiku-4-5", "haiku_45"),
    ("claude-haiku-5-5", "haiku_55"),
    ("claude-3-5-sonnet", "3_15"), ("claude-3-7-sonnet", "3_15"), ("claude-sonnet-4", "3_15"),
    ("claude-sonnet-4-0", "3_15"), ("claude-sonnet-4-5", "3_15"), ("claude-sonnet-4-6", "3_15"),
    ("claude-sonnet-5", "2_10"), ("claude-sonnet-5-5", "2_10_read_0_10"),
    ("claude-opus-4", "15_75"), ("claude-opus-4-0", "15_75"), ("claude-opus-4-1", "15_75"),
    ("claude-opus-4-5", "5_25"), ("claude-opus-4-6", "5_25"), ("claude-opus-4-7", "5_25"), ("claude-opus-4-8", "5_25"),
    ("claude-opus-5", "5_25"), ("claude-opus-5-5", "4_20_read_0_20"),
    ("claude-fable-5", "10_50"), ("claude-fable-5-1", "10_50_read_0_25"), ("claude-fable-5-2", "8_40_read_0_20"),
    ("claude-mythos-5", "10_50"), ("claude-mythos-5-1", "10_50_read_0_25"), ("claude-mythos-5-2", "8_40_read_0_20"))},
    **{model: price(input, output, cache_read, cache_write or input, cache_write or input, long_prompt)
       for model, (input, output, cache_read, cache_write, long_prompt) in {
        # The other agents' models, by the name their telemetry gives, from LiteLLM's list (docs/agents.md says
        # which commit, and which entry each comes from). Cache writes: the input price where the list gives none
        # (OpenAI and Google bill none). Above a prompt size a dearer price, as listed.
        "gpt-5": ("1.25", "10", "0.125", None, None), "gpt-5.1": ("1.25", "10", "0.125", None, None),
        "gpt-5.2": ("1.75", "14", "0.175", None, None),
        "gpt-5.5": ("5", "30", "0.5", None, (272_000, price("10", "45", "1", "10", "10"))),
        "gpt-5.6": ("5", "30", "0.5", "6.25", (272_000, price("10", "45", "1", "12.5", "12.5"))),
        "gpt-5.6-sol": ("5", "30", "0.5", "6.25", (272_000, price("10", "45", "1", "12.5", "12.5"))),
        "gpt-5.6-terra": ("2.5", "15", "0.25", "3.125", (272_000, price("5", "22.5", "0.5", "6.25", "6.25"))),
        "gpt-5.6-luna": ("1", "6", "0.1", "1.25", (272_000, price("2", "9", "0.2", "2.5", "2.5"))),
        "gemini-2.5-flash": ("0.3", "2.5", "0.03", None, None),
        "gemini-2.5-flash-lite": ("0.1", "0.4", "0.01", None, None),
        "gemini-2.5-pro": ("1.25", "10", "0.125", None, (200_000, price("2.5", "15", "0.25", "2.5", "2.5"))),
        "gemini-3-flash-preview": ("0.5", "3", "0.05", None, None),
        "gemini-3.1-flash-lite": ("0.25", "1.5", "0.025", None, None),
        "gemini-3.1-pro-preview": ("2", "12", "0.2", None, (200_000, price("4", "18", "0.4", "4", "4"))),
        "gemini-3.5-flash": ("1.5", "9", "0.15", None, None),
        "qwen3-coder-plus": ("1", "5", "0.1", None, (32_000, price("1.8", "9", "0.18", "1.8", "1.8", (
            128_000, price("3", "15", "0.3", "3", "3", (256_000, price("6", "60", "0.6", "6", "6"))))))),
    }.items()}}
US_ONLY_INFERENCE = decimal.Decimal("1.1")  # Claude Code's surcharge for inference_geo "us"
MODEL_ID_NOISE = re.compile(r"^(?:[a-z]{2,4}\.)?anthropic\.|(?:-v\d+(?::\d+)?|@\d{8}|-\d{8}|\[1m\])$")


def price_of(model: str, overrides: dict[str, Price] | None = None) -> Price | None:
    """The price of a model by its name as the API or a provider spells it (claude-sonnet-4-5-20250929,
    us.anthropic.claude-sonnet-4-5-20250929-v1:0, claude-sonnet-4-5@20250929, ...); `overrides` win; None when
    unknown."""
    table = {**PRICES, **(overrides or {})}
    name = model.strip().lower()
    while name not in table:
        shorter = MODEL_ID_NOISE.sub("", name)
        if shorter == name:
            return table.get(name)
        name = shorter
    return table[name]


def cost_nanos(price: Price, input: int, output: int, cache_read: int, cache_creation: int, cache_1h: int = 0,
               inference_geo: str = "") -> int:
    """What a request costs at `price`, in nano-dollars, computed as Claude Code does: 1-hour cache writes at
    their own price (never more than all cache writes), long prompts at the long-prompt price."""
    while price.long_prompt and input + cache_read + cache_creation > price.long_prompt[0]:
        price = price.long_prompt[1]
    one_hour = min(max(cache_1h, 0), cache_creation)
    per_million = (input * price.input + output * price.output + cache_read * price.cache_read +
                   (cache_creation - one_hour) * price.cache_write_5m + one_hour * price.cache_write_1h)
    if inference_geo == "us":
        per_million *= US_ONLY_INFERENCE
    return int((per_million * 1000).to_integral_value(decimal.ROUND_HALF_EVEN))  # 1e9 nanos / 1e6 tokens


def shares(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights` (evenly when they are all 0), in whole units that add up to it
    exactly: the last share takes what rounding down left."""
    if not any(weights):
        weights = [1] * len(weights)
    parts = [total * weight // sum(weights) for weight in weights]
    parts[-1] += total - sum(parts)
    return parts


def uuid7_ms(text: str) -> int | None:
    """The time (ms since the epoch) a UUIDv7 was made at, its first 48 bits; None for anything else."""
    digits = text.replace("-", "").lower() if isinstance(text, str) else ""
    if len(digits) != 32 or digits[12] != "7" or not all(c in "0123456789abcdef" for c in digits):
        return None
    return int(digits[:12], 16)


def estimated_cost(model: str, input: int, output: int, cache_read: int, cache_creation: int,
                   prices: dict[str, Price] | None = None) -> int:
    """What ccmon's price table (with `prices` overriding it) says a call costs, in nano-dollars; 0 for a model it
    has no price for."""
    found = price_of(model, prices)
    return cost_nanos(found, input, output, cache_read, cache_creation) if found else 0


# ---------------------------------------------------------------- Values: what the store reads, the wire carries and the screens show
# One type per concept: the store's reads build them, the query service sends them, the client builds the same
# ones from the server's answers, and reports and the monitor show them.

@dataclasses.dataclass(frozen=True)
class ApiRequest:
    """One API request of a coding agent's (Claude Code's, unless `agent` says another) and what it used."""
    ts_ms: int
    model: str
    session_id: str
    usage: Usage
    agent: str = CLAUDE_CODE


@dataclasses.dataclass(frozen=True)
class RequestsPage:
    """One page of a period's API requests, and how many the period has."""
    requests: tuple[ApiRequest, ...]
    total: int


@dataclasses.dataclass(frozen=True)
class Session:
    """A Claude Code session's totals."""
    session_id: str
    user: str
    first_ms: int
    last_ms: int
    split: Split
    models: tuple[str, ...]   # highest cost first
    tool_calls: int
    tool_failures: int
    api_errors: int
    from_metrics: bool
    project: str              # '' when unknown
    source: str               # where most of its usage comes from: events, metrics, transcript; with * when ccmon
    # priced some (estimated); events+tx or metrics+tx when some requests came from transcripts
    agent: str = CLAUDE_CODE  # the coding agent whose session it is


@dataclasses.dataclass(frozen=True)
class TimelineEntry:
    """One moment of a session: an API request, or another of its events with that event's attributes."""
    ts_ms: int
    kind: str                 # api_request, or the event's name
    request: ApiRequest | None
    details: dict             # the event's attributes; {} for a request


@dataclasses.dataclass(frozen=True)
class ToolFigures:
    """How one tool's calls went in a period."""
    tool: str
    calls: int
    successes: int
    p50_ms: int
    p95_ms: int


@dataclasses.dataclass(frozen=True)
class DecisionCount:
    """How often a permission decision was made, and by what."""
    decision: str
    source: str
    count: int


@dataclasses.dataclass(frozen=True)
class ApiErrorCount:
    """How often a model answered with an error status."""
    status_code: str
    model: str
    count: int


@dataclasses.dataclass(frozen=True)
class ToolReport:
    """A period's tool calls, permission decisions and API errors, most frequent first."""
    tools: tuple[ToolFigures, ...] = ()
    decisions: tuple[DecisionCount, ...] = ()
    errors: tuple[ApiErrorCount, ...] = ()
    retries_exhausted: int = 0


@dataclasses.dataclass(frozen=True)
class DayUsage:
    """A calendar day's usage."""
    date: str                 # YYYY-MM-DD in the zone asked for
    split: Split


@dataclasses.dataclass(frozen=True)
class SeriesPoint:
    """One bucket of a time series: the usage from start_ms for one bucket length (an hour, a local day or a
    local week), of one group (a model, user or project; '' when the series is not grouped)."""
    start_ms: int
    group: str
    split: Split


@dataclasses.dataclass(frozen=True)
class HistoryReading:
    """How far the local server is in its first reading of the transcripts and histories on its machine (newest
    files first, see TranscriptFiles.paths): figures are partial until it is done."""
    files_read: int
    files: int


@dataclasses.dataclass(frozen=True)
class UsageSeries:
    """A period's usage bucket by bucket (empty buckets left out), and Claude's own limit readings in it, oldest
    first: what charts draw."""
    bucket: str                             # hour, day or week
    points: tuple[SeriesPoint, ...] = ()
    readings: tuple[LimitReading, ...] = ()
    agent_readings: tuple[LimitReading, ...] = ()  # other agents' of their own plans' limits (Codex's), by agent


@dataclasses.dataclass(frozen=True)
class ModelUsage:
    """A model's usage in a period, and whose model it is."""
    model: str
    usage: Usage
    agent: str = CLAUDE_CODE


@dataclasses.dataclass(frozen=True)
class UsageBlock:
    """A 5-hour block and the usage in it."""
    start_ms: int
    end_ms: int
    split: Split
    last_activity_ms: int
    from_claude: bool = False   # the window is Claude's own, from a reading's reset time


@dataclasses.dataclass(frozen=True)
class UserUsage:
    """A user's usage in a period, and Claude's own windows of theirs while a reading of them is live."""
    user: str
    split: Split
    sessions: int
    five_hour: LimitWindow | None = None
    seven_day: LimitWindow | None = None
    agents: tuple[LimitReading, ...] = ()  # other agents' own plans' live windows of theirs (Codex's), by agent


@dataclasses.dataclass(frozen=True)
class ProjectUsage:
    """A project's usage in a period ('' is the sessions without a project)."""
    project: str
    split: Split
    sessions: int


RECEIVER_PROTOCOLS = ("grpc", "http/protobuf", "http/json")  # as OTEL_EXPORTER_OTLP_PROTOCOL names them


@dataclasses.dataclass(frozen=True)
class ReceiverCounts:
    """What one receiver protocol took of one signal (logs, metrics): when it last accepted a record (None: never),
    and how many records it accepted and rejected, ever. Cumulative: they never go down."""
    protocol: str
    signal: str
    last_ms: int | None
    accepted: int
    rejected: int


@dataclasses.dataclass(frozen=True)
class CounterSeries:
    """One counter series of the Prometheus metrics: everything a user's usage of a model in a project ever added
    up to (stored rows and what retention and replacements retired), None for a name beyond the labels' cap."""
    user: str | None
    model: str | None
    project: str | None   # '' for sessions without a project
    usage: Usage
    agent: str = CLAUDE_CODE  # the model's (models.agent), named past the caps too: a model's agent never changes


@dataclasses.dataclass(frozen=True)
class StoreTotals:
    """What a store holds: API requests, and every usage row (those derived from metrics too)."""
    requests: int
    rows: int


@dataclasses.dataclass(frozen=True)
class SessionUsage:
    """A session's usage: the newest session's, for @session_cost."""
    session_id: str
    split: Split


@dataclasses.dataclass(frozen=True)
class StatusLineFigures:
    """What the server tells a status line as it stores its reading: the reading's session's usage and its user's
    today, None where it does not know them."""
    session: Split | None
    today: Split | None
    user: str | None = None  # the session's user


@dataclasses.dataclass(frozen=True)
class ImportCounts:
    """What importing requests from transcripts did (or, in a dry run, would do)."""
    imported: int
    already_known: int
    readings: int = 0  # other agents' limit readings stored


# ---------------------------------------------------------------- Blocks and plans: 5-hour windows, limits, projections

PLAN_TOKEN_LIMITS = {"pro": 7_000, "max": 35_000, "max20": 140_000}


def parse_block_mode(text: Any) -> int | str:
    """'auto' -> 'auto'; '5am' -> 5, '11pm' -> 23, '12am' -> 0; ValueError otherwise."""
    if str(text).strip().lower() == "auto":
        return "auto"
    match = re.fullmatch(r"\s*(1[0-2]|0?[1-9])\s*(am|pm)\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(text)
    return int(match.group(1)) % 12 + (12 if match.group(2).lower() == "pm" else 0)


def current_block(now_ms: int, zone: ZoneInfo, start_hour: int) -> tuple[int, int]:
    """The 5-hour block holding now_ms: blocks start at start_hour local time and every 5 hours after;
    the cycle restarts at the next start_hour, which cuts the last block of a day short."""
    local = dt.datetime.fromtimestamp(now_ms / 1000, zone)
    anchor_day = local.date()
    anchor = ms_from_datetime(dt.datetime.combine(anchor_day, dt.time(start_hour), zone))
    if anchor > now_ms:
        anchor_day -= dt.timedelta(days=1)
        anchor = ms_from_datetime(dt.datetime.combine(anchor_day, dt.time(start_hour), zone))
    next_anchor = ms_from_datetime(dt.datetime.combine(anchor_day + dt.timedelta(days=1), dt.time(start_hour), zone))
    start = anchor + (now_ms - anchor) // BLOCK_MS * BLOCK_MS
    return start, min(start + BLOCK_MS, next_anchor)


def token_limit(plan: str, max_tokens: int | str) -> int | None:
    """claude.max_tokens when set, else the plan's default, else no limit ('auto' starts from the default)."""
    return (max_tokens if isinstance(max_tokens, int) else 0) or PLAN_TOKEN_LIMITS.get(plan)


LEARN_FROM_MS = 30 * DAY_MS     # a learned limit looks at the blocks of the last 30 days


def recent_pace_start(now_ms: int) -> int:
    """Projections use the recent pace, not the whole block's: since the start of the previous quarter hour (15 to
    30 minutes), whole quarter hours, which the rollups answer without reading rows."""
    return now_ms - now_ms % BUCKET_MS - BUCKET_MS


READING_HORIZON_MS = 45 * DAY_MS  # Claude's windows reset within days (a gateway's spend limit within a month)


def reading_problem(reading: LimitReading, now: int) -> str:
    """What makes a status line reading impossible, or '': Claude's shares are 0-100 and its windows reset
    within weeks, so a reading beyond that would only mislead every screen that shows it."""
    if not 0 <= reading.read_ms <= MAX_TIMESTAMP_MS:
        return "read_at is out of range"
    if reading.context_percent is not None and not 0 <= reading.context_percent <= 100:
        return "context_percent is not 0-100"
    for name, window in (("five_hour", reading.five_hour), ("seven_day", reading.seven_day),
                         ("spend_limit", reading.spend_limit)):
        if window is not None and not 0 <= window.percent <= 100:  # NaN fails this too
            return f"{name}.used_percentage {window.percent!r} is not 0-100"
        if window is not None and not 0 < window.resets_ms <= now + READING_HORIZON_MS:
            return f"{name}.resets_at is not within {READING_HORIZON_MS // DAY_MS} days"
    return ""


def agent_reading_problem(reading: LimitReading, now: int) -> str:
    """What makes another agent's limit reading (read from its history) impossible, or ''."""
    if reading.agent not in AGENTS or reading.agent == CLAUDE_CODE:
        return f"not another agent's ({', '.join(AGENTS[1:])}): Claude's come from its status line"
    if not reading.session_id:
        return "a reading needs its session_id"
    return reading_problem(reading, now)


def claude_window_key(resets_ms: int) -> int:
    """Which of Claude's windows a reset time names, as that time to the ten minutes: readings of one window
    report it a few seconds apart."""
    return round(resets_ms / 600_000) * 600_000


CALIBRATE_FROM_PERCENT = 5.0  # readings below this share of a window say too little to divide by


def window_capacity(samples: list[tuple[int, float]]) -> tuple[int | None, int]:
    """What a full window of Claude's holds, from (premium tokens used in it so far, percent Claude reported)
    pairs, one per window: the median of tokens / share; (None, 0) without a usable reading."""
    estimates = sorted(tokens * 100 / percent for tokens, percent in samples
                       if percent >= CALIBRATE_FROM_PERCENT and tokens > 0)
    if not estimates:
        return None, 0
    middle = len(estimates) // 2
    median = estimates[middle] if len(estimates) % 2 else (estimates[middle - 1] + estimates[middle]) / 2
    return round(median), len(estimates)


def learned_limit(completed_blocks: list[int], floor: int | None) -> tuple[int | None, int]:
    """The 90th percentile (nearest rank) of completed blocks' premium tokens, never below `floor`;
    returns (limit, how many blocks it was learned from)."""
    used = sorted(tokens for tokens in completed_blocks if tokens > 0)
    if not used:
        return floor, 0
    p90 = used[max(0, -(-len(used) * 9 // 10) - 1)]
    return max(p90, floor or 0), len(used)


def block_window(mode: int | str | None, now: int, zone: ZoneInfo,
                 auto_blocks: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The block holding `now`: fixed-hour blocks by the clock; automatic ones from the server's list."""
    if isinstance(mode, int):
        return current_block(now, zone, mode)
    if mode is None:
        return None
    active = [(start, end) for start, end in auto_blocks if start <= now < end]
    return active[-1] if active else None


def block_around(moment: int, previous_end: int, windows: list[tuple[int, int]]) -> tuple[int, int, bool]:
    """The automatic block that activity at `moment` starts after a block that ended at `previous_end`, as
    (start, end, from Claude): Claude's own window when one of `windows` holds the moment; else from the moment
    floored to the hour (not before the previous block or a window of Claude's ended) for 5 hours, cut short
    where a window of Claude's begins."""
    for start, end in windows:
        if start <= moment < end:
            return start, end, True
    begin = max([moment - moment % HOUR_MS, previous_end] + [end for _, end in windows if end <= moment])
    return begin, min([begin + BLOCK_MS] + [start for start, _ in windows if start > moment]), False


def per_minute(tokens: int, elapsed_ms: int) -> float:
    return tokens / (elapsed_ms / 60_000) if elapsed_ms > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class BlockStatus:
    start_ms: int
    end_ms: int
    now_ms: int
    used: int               # premium limited tokens (input + output of non-Haiku models)
    limit: int | None
    recent_rate: float | None = None  # tokens/min over the last minutes; the projection's pace when known

    @property
    def elapsed_ms(self) -> int:
        return self.now_ms - self.start_ms

    @property
    def remaining_ms(self) -> int:
        return max(0, self.end_ms - self.now_ms)

    @property
    def burn_rate(self) -> float:
        """The pace projections use: the recent one when known, else the block's average."""
        return self.recent_rate if self.recent_rate is not None else per_minute(self.used, self.elapsed_ms)

    def limit_reached_ms(self) -> int | None:
        """When the limit is reached at the current pace, if before the block ends."""
        if self.limit is None:
            return None
        if self.used >= self.limit:
            return self.now_ms
        if self.burn_rate <= 0:
            return None
        at = self.now_ms + int((self.limit - self.used) / self.burn_rate * 60_000)
        return at if at < self.end_ms else None

    def projected_at_end(self) -> int:
        return self.used + int(self.burn_rate * self.remaining_ms / 60_000)

    @property
    def percent(self) -> float | None:
        return self.used / self.limit * 100 if self.limit else None


# ---------------------------------------------------------------- Configuration: the settings, files, flags, validation

class ConfigError(Exception):
    """A user-supplied setting is invalid; the message names it and says what is accepted."""


TOKEN_ENV = "CCMON_TOKEN"
CONFIG_NAMES = ("config.toml", "config.yaml", "config.yml", "config.json")
PLANS = ("unset", "pro", "max", "max20")
MIN_RETENTION_S = 24 * 3600
REFRESH_RANGE_S = (1, 300)
STATUS_LINE_WAIT_RANGE_MS = (50, 30_000)
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000 ** 2, "mib": 1024 ** 2, "gb": 1000 ** 3,
              "gib": 1024 ** 3}
MESSAGE_SIZE_RANGE = (1024 ** 2, 1024 ** 3)


def parse_duration(text: Any, units: str = "smhd") -> int:
    """'90s', '5m', '6h', '7d' -> seconds; raises ValueError on anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-z])\s*", str(text))
    if not match or match.group(2) not in units:
        raise ValueError(text)
    return int(match.group(1)) * DURATION_UNITS[match.group(2)]



def parse_address(address: str, fail_as: Callable[[str], Exception]) -> tuple[str, int]:
    """'host:port', '[v6]:port' or a monitor's 'https://host:port' -> (host, port)."""
    match = re.fullmatch(r"(?:https?://)?(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d{1,5})/?", address, re.IGNORECASE)
    if not match or int(match.group(2)) > 65535:
        raise fail_as(f"invalid address {address!r} (use HOST:PORT such as 127.0.0.1:4317)")
    return match.group(1), int(match.group(2))


# -- readers: a setting's value as written (in a file, a flag or the environment) -> the value ccmon uses, or
#    ValueError with what is wrong, in words that say what is accepted (the caller names the setting and where)

def read_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value.strip()


def read_path(value: Any) -> Path:
    text = read_text(value)
    if "\0" in text:  # a file name cannot hold one (os.open refuses it)
        raise ValueError(f"a path cannot hold a NUL character, got {text!r}")
    try:
        os.fsencode(text)
    except UnicodeEncodeError:  # a lone surrogate a JSON or YAML file can escape
        raise ValueError(f"not a file name this system can use: {text!r}") from None
    return Path(text).expanduser()


def read_address(value: Any) -> str:
    address = read_text(value)
    parse_address(address, fail_as=ValueError)
    return address


def read_listener(value: Any) -> str | None:
    """An address to listen on, or None for 'off'."""
    address = read_text(value)
    if address.lower() == "off":
        return None
    parse_address(address, fail_as=lambda problem: ValueError(problem + " or 'off'"))
    return address


def read_retention(value: Any) -> int | None:
    """Seconds, or None: keep forever."""
    text = read_text(value).lower()
    if text == "never":
        return None
    try:
        seconds = parse_duration(text, units="hd")
    except ValueError:
        raise ValueError(f"invalid retention {text!r} (use 'never', or a number of days or hours such as '30d' or "
                         "'48h')") from None
    if seconds < MIN_RETENTION_S:
        raise ValueError(f"retention {text!r} is below the minimum of 24h")
    return seconds


def read_refresh_interval(value: Any) -> int:
    try:
        seconds = parse_duration(read_text(value), units="sm")
    except ValueError:
        raise ValueError(f"invalid interval {value!r} (use seconds or minutes such as '5s' or '1m', from 1s to "
                         "5m)") from None
    if not REFRESH_RANGE_S[0] <= seconds <= REFRESH_RANGE_S[1]:
        raise ValueError(f"interval {value!r} is outside the allowed range 1s to 5m")
    return seconds


def read_status_line_wait(value: Any) -> float:
    """'250ms', '2s' -> seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*(ms|s)\s*", str(value))
    if not match:
        raise ValueError(f"invalid wait {value!r} (use milliseconds or seconds such as '250ms' or '2s', from 50ms "
                         "to 30s)")
    ms = int(match.group(1)) * (1 if match.group(2) == "ms" else 1000)
    if not STATUS_LINE_WAIT_RANGE_MS[0] <= ms <= STATUS_LINE_WAIT_RANGE_MS[1]:
        raise ValueError(f"wait {value!r} is outside the allowed range 50ms to 30s")
    return ms / 1000


def read_zone(value: Any) -> str:
    zone = read_text(value)
    if zone_or_none(zone) is None:
        raise ValueError(f"unknown timezone {zone!r} (use an IANA name such as 'UTC', 'Europe/Berlin' or "
                         "'Asia/Taipei')")
    return zone


def read_plan(value: Any) -> str:
    plan = read_text(value).lower()
    if plan not in PLANS:
        raise ValueError(f"unknown plan {value!r} (accepted: {', '.join(PLANS)})")
    return plan


def whole_number(value: Any) -> int | None:
    """A whole number >= 0, written as a number or in digits; None for anything else."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def read_block_limit(value: Any) -> int | str:
    """Tokens, 0 for the plan's default, or 'auto'."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    number = whole_number(value)
    if number is None:
        raise ValueError(f"invalid token limit {value!r} (use a whole number >= 0, 0 meaning the plan's default, "
                         "or 'auto' to learn it)")
    return number


def read_weekly_limit(value: Any) -> int:
    number = whole_number(value)
    if number is None:
        raise ValueError(f"invalid token limit {value!r} (use a whole number >= 0; 0 means none)")
    return number


def read_block(value: Any) -> int | str | None:
    """A fixed start hour, 'auto', or None (blocks not tracked)."""
    if not str(value).strip():
        return None
    try:
        return parse_block_mode(value)
    except ValueError:
        raise ValueError(f"invalid block start {value!r} (use auto, or an hour from 1 to 12 followed by am or pm, "
                         "such as 5am or 11pm)") from None


def read_percents(value: Any) -> tuple[int, ...]:
    """One percentage or a list of them, 1 to 100, '%' allowed."""
    percents = set()
    for alert in value if isinstance(value, list) else [value]:
        text = str(alert).strip().rstrip("%")
        if isinstance(alert, bool) or not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 100:
            raise ValueError(f"invalid alert threshold {alert!r} (use whole percentages from 1 to 100, such as 80)")
        percents.add(int(text))
    return tuple(sorted(percents))


def read_switch(value: Any) -> bool:
    if str(value).lower() not in ("true", "false"):
        raise ValueError("expected true or false")
    return str(value).lower() == "true"


def read_ttl(value: Any) -> int:
    try:
        return parse_duration(value, units="smh")
    except ValueError:
        raise ValueError(f"invalid duration {value!r} (use seconds, minutes or hours such as '1m')") from None


def read_command(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a shell command as a string")
    return value.strip()


def read_token(value: Any) -> str:
    """What an Authorization header and gRPC metadata can carry: printable ASCII, no spaces."""
    if not isinstance(value, str) or not re.fullmatch(r"[!-~]*", value):
        raise ValueError("a token must be printable ASCII without spaces (letters, digits, punctuation)")
    return value


def read_file(value: Any) -> Path | None:
    """An existing file, or None when empty."""
    if not isinstance(value, str):
        raise ValueError(f"expected a file path, got {value!r}")
    if not value.strip():
        return None
    path = Path(value.strip()).expanduser()
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


def read_size(value: Any) -> int:
    """Bytes, from '16MiB', '1000000' or '2GB'."""
    text = str(value).strip()
    match = re.fullmatch(r"(\d+)\s*([a-zA-Z]*)", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise ValueError(f"invalid size {text!r} (use bytes or a size such as '16MiB')")
    size = int(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    if not MESSAGE_SIZE_RANGE[0] <= size <= MESSAGE_SIZE_RANGE[1]:
        raise ValueError(f"size {text!r} is outside the allowed range 1MiB to 1GiB")
    return size


# -- the settings, each declared once

@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting. Its flag, its place in a config file, how it is read and checked, config.toml.example and
    the table in docs/configuration.md all come from this declaration (a test holds the two files to it)."""
    key: str                        # section.name in a config file
    default: Any                    # as a config file writes it
    read: Callable[[Any], Any]      # what is written -> what ccmon uses (see the readers above)
    help: str
    metavar: str
    scope: str                      # who reads it, one of SCOPES: each command's --help shows its scopes
    field: str | None               # the Config attribute it sets; None: one of several that make a derived one
    flags: tuple[str, ...] = ()     # default: --section-name
    env: str | None = None          # an environment variable, between the flag and the file in precedence
    repeatable: bool = False        # a flag given several times, a list in a file

    @property
    def section(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def name(self) -> str:
        return self.key.split(".", 1)[1]

    @property
    def options(self) -> tuple[str, ...]:
        return self.flags or ("--" + self.key.replace(".", "-").replace("_", "-"),)

    @property
    def label(self) -> str:
        """How an error names the flag: '-b/--block'."""
        return "/".join(self.options)

    @property
    def dest(self) -> str:
        return self.key.replace(".", "_")


SCOPES = {  # scope -> the title of its group of options in --help
    "server": "server (ccmon --server)",
    "connection": "the server to query (the monitor, --format, --json, --health, report, statusline, import, setup)",
    "time": "days and times (the monitor, --format, --json, report, statusline, import --since)",
    "monitor": "the monitor",
    "limits": "Claude's limits and 5-hour blocks (the monitor, --format, --json, report, statusline)",
}
SETTINGS = (
    Setting("database.path", "~/.ccmon/ccmon.db", read_path, "the server's database; the folder is created",
            "PATH", "server", "database_path"),
    Setting("server.address", "127.0.0.1:4317", read_address, "OTLP gRPC and the QueryService", "HOST:PORT",
            "server", "server_address"),
    Setting("server.http_address", "127.0.0.1:4318", read_listener, "OTLP/HTTP, or 'off'", "HOST:PORT",
            "server", "server_http_address"),
    Setting("server.retention", "never", read_retention, "how long to keep requests: 'never', or days or hours such as 30d or 48h, at least 24h", "DURATION",
            "server", "server_retention_s"),
    Setting("server.token", "", read_token, "require 'Authorization: Bearer TOKEN' on every export and query",
            "TOKEN", "server", "server_token", env=TOKEN_ENV),
    Setting("server.tls_cert", "", read_file, "PEM certificate; with tls_key turns on TLS for both listeners",
            "PEM", "server", None),
    Setting("server.tls_key", "", read_file, "PEM private key of tls_cert", "PEM", "server", None),
    Setting("server.tls_client_ca", "", read_file, "require client certificates signed by this CA (mutual TLS)",
            "PEM", "server", None),
    Setting("server.max_message_size", "16MiB", read_size, "largest accepted export after decompression, 1MiB "
            "to 1GiB", "SIZE", "server", "max_message_bytes"),
    Setting("server.cache.stats.enabled", True, read_switch, "accepted for the original Go ccmon's config; no "
            "effect (rollups need no cache)", "BOOL", "server", None),
    Setting("server.cache.stats.ttl", "1m", read_ttl, "accepted for the original Go ccmon's config; no effect",
            "DURATION", "server", None),
    Setting("monitor.server", "127.0.0.1:4317", read_address, "the server to query; https://HOST:PORT for TLS", "HOST:PORT", "connection", "monitor_server"),
    Setting("monitor.autostart", True, read_switch, "when no server is named and none answers at server.address, start this machine's own in the background (it keeps running)", "BOOL", "connection", "monitor_autostart"),
    Setting("monitor.timezone", "UTC", read_zone, "IANA timezone of days, weeks and months, e.g. Europe/Berlin",
            "ZONE", "time", "monitor_timezone"),
    Setting("monitor.refresh_interval", "5s", read_refresh_interval, "how often the monitor refreshes, 1s to 5m",
            "DURATION", "monitor", "refresh_interval_s"),
    Setting("monitor.statusline_wait", "250ms", read_status_line_wait, "how long ccmon statusline waits for the "
            "server before it shows what it has (Claude Code waits for its line); more for a distant team server",
            "DURATION", "connection", "status_line_wait_s"),
    Setting("monitor.token", "", read_token, "token sent to the server", "TOKEN", "connection", "monitor_token",
            env=TOKEN_ENV),
    Setting("monitor.tls_ca", "", read_file, "CA that signed the server's certificate (or write the server as "
            "https://HOST:PORT for the system's CAs)", "PEM", "connection", None),
    Setting("monitor.tls_cert", "", read_file, "client certificate for mutual TLS", "PEM", "connection", None),
    Setting("monitor.tls_key", "", read_file, "private key of tls_cert", "PEM", "connection", None),
    Setting("monitor.alert_percent", [], read_percents, "alert when block or weekly usage crosses PERCENT",
            "PERCENT", "monitor", "alert_percents", flags=("--alert",), repeatable=True),
    Setting("monitor.alert_command", "", read_command, "run COMMAND on an alert, with the figures in "
            "CCMON_ALERT_* variables", "COMMAND", "monitor", "alert_command"),
    Setting("claude.plan", "unset", read_plan, f"your Claude plan: {', '.join(PLANS)}", "PLAN", "limits", "plan"),
    Setting("claude.max_tokens", 0, read_block_limit, "block token limit: 0 for the plan's default, 'auto' to "
            "calibrate it from Claude's own readings (ccmon statusline), else learn it from past blocks", "N",
            "limits", "max_tokens"),
    Setting("claude.weekly_max_tokens", 0, read_weekly_limit, "weekly premium token limit: 0 for none (or the one "
            "calibrated while a reading of Claude's week is live)", "N", "limits", "weekly_max_tokens"),
    Setting("claude.block", "", read_block, "track 5-hour blocks: 'auto' (from your first request, like Claude's "
            "own windows) or a fixed start hour such as 5am", "HOUR", "limits", "block_mode", flags=("-b", "--block")),
)
SECTIONS = (*dict.fromkeys(setting.section for setting in SETTINGS), "pricing")  # [pricing] is keyed by models


@dataclasses.dataclass(frozen=True)
class TLSFiles:
    """PEM files: a server's cert/key (+ client CA for mutual TLS), or a client's CA (+ cert/key)."""
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    server_name: str | None = None  # a client's: the name the server's certificate is checked against


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace path with data whole or not at all: a temporary file in the same folder, flushed to disk, with
    the mode given, renamed over it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, mode)  # os.open's mode passes through the umask
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)


def read_pem(path: Path | None) -> bytes | None:
    return path.read_bytes() if path else None


class ConfigViews:
    """What Config's users read that is not a setting of its own."""

    @property
    def prices(self) -> dict[str, Price]:
        return dict(self.pricing)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.monitor_timezone)


# The settings as ccmon uses them: a field per setting (Setting.field), and those made of several settings or of
# where they came from.
Config = dataclasses.make_dataclass("Config", [
    *((setting.field, Any) for setting in SETTINGS if setting.field),
    ("server_tls", TLSFiles | None),      # server.tls_*; None: plaintext
    ("monitor_tls", TLSFiles | None),     # monitor.tls_* or an https:// monitor.server; None: plaintext
    ("source", str),                      # the config file used, or "defaults"
    ("monitor_server_given", bool, False),  # monitor.server set by a flag or the file, not the default
    ("pricing", tuple, ()),               # [pricing]: (model, Price) added to or overriding PRICES
    ("figure_settings", tuple, ()),       # (key, value as written) of the time and limits settings other than
                                          # their defaults: what a server needs to work out this client's figures
    ("server_flags", tuple, ()),          # (Setting, value as written, files made absolute) of the server
                                          # settings given as flags, or naming a file relative to the folder
                                          # the client runs in: what a server this client starts gets too
], bases=(ConfigViews,), frozen=True)
FIGURE_SCOPES = ("time", "limits")


def read_config_file(path: Path) -> dict:
    """Parse a TOML, YAML or JSON config file by its extension."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(raw.decode())
        elif path.suffix == ".json":
            data = json.loads(raw)
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(
                    f"{path}: YAML config needs PyYAML: run 'pip install pyyaml', use the "
                    "ccmon.pyz build (it bundles PyYAML), or write config.toml instead") from None
            data = yaml.safe_load(raw) or {}
        else:
            raise ConfigError(f"{path}: unknown config format (use .toml, .yaml, .yml or .json)")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a ccmon config (it has sections of settings)") from None
    except Exception as exc:  # yaml.YAMLError without importing yaml at module level
        if type(exc).__module__.startswith("yaml"):
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        raise
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of sections")
    return data


def config_file_candidates(explicit: str | None, search_cwd: bool) -> list[Path]:
    """The files a configuration may come from, first found first: --config, else ./config.* (with `search_cwd`),
    then ~/.ccmon/config.*."""
    if explicit:
        return [Path(explicit).expanduser()]
    folders = (Path.cwd(), Path.home() / ".ccmon") if search_cwd else (Path.home() / ".ccmon",)
    return [folder / name for folder in folders for name in CONFIG_NAMES]


def is_config_file(path: Path) -> bool:
    """Whether a file is there; a place that cannot even be looked at (a HOME without permission) is a config
    error, not a traceback."""
    try:
        return path.is_file()
    except OSError as exc:
        raise ConfigError(f"cannot look for a config file at {path}: {exc.strerror}") from None


def config_file_data(explicit: str | None, search_cwd: bool = True) -> tuple[Path | None, dict]:
    """The config file and its contents: --config, else ./config.* when it is ccmon's (and `search_cwd`), else
    ~/.ccmon/config.*. A file in the current folder with none of ccmon's sections belongs to some other tool
    (a site generator's config.toml, an app's config.json): it is passed over, so ccmon works in every folder."""
    if explicit:
        path, = config_file_candidates(explicit, search_cwd)
        if not is_config_file(path):
            raise ConfigError(f"--config: no such file: {path}")
        return path, read_config_file(path)
    for path in config_file_candidates(None, search_cwd):
        if not is_config_file(path):
            continue
        if path.parent != Path.cwd():
            return path, read_config_file(path)
        try:
            data = read_config_file(path)
        except ConfigError as exc:  # unreadable: ccmon's own (and worth an error) if it names a section of ours
            try:
                ours = re.search(rf"\b({'|'.join(SECTIONS)})\b", path.read_text(errors="replace"))
            except OSError:
                ours = None  # not even readable as text: not a file to stop for
            if ours:
                raise
            log.debug("passing over %s: %s", path, exc)
            continue
        if any(section in SECTIONS for section in data):
            return path, data
        log.debug("passing over %s: it has none of ccmon's sections (%s)", path, ", ".join(SECTIONS))
    return None, {}


def flattened(table: dict, prefix: str = "") -> dict[str, Any]:
    """{'cache': {'stats': {'ttl': '1m'}}} -> {'cache.stats.ttl': '1m'}: nested tables as dotted keys."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flattened(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


PRICE_KEYS = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")


def parse_pricing(table: dict, label: str) -> tuple[tuple[str, Price], ...]:
    """[pricing]: MODEL = {input = 3, output = 15, cache_read = 0.3, cache_write_5m = 3.75, cache_write_1h = 6},
    USD per million tokens; cache prices default to Anthropic's ratios to input (0.1, 1.25, 2)."""
    prices = []
    for model, entry in table.items():
        where = f"{label} {model!r}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table such as {{input = 3, output = 15}}, got {entry!r}")
        unknown = sorted(set(entry) - set(PRICE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]} (known: {', '.join(PRICE_KEYS)})")
        values = {}
        for key in PRICE_KEYS:
            if key not in entry:
                continue
            value = entry[key]
            try:
                number = decimal.Decimal(str(value)) if not isinstance(value, bool) else None
            except decimal.InvalidOperation:
                number = None
            if number is None or not number.is_finite() or not 0 <= number <= 10_000:
                raise ConfigError(f"{where}: {key} must be a price in USD per million tokens from 0 to 10000, "
                                  f"got {value!r}")
            values[key] = number
        if "input" not in values or "output" not in values:
            raise ConfigError(f"{where}: needs at least input and output (USD per million tokens)")
        ratios = {"cache_read": "0.1", "cache_write_5m": "1.25", "cache_write_1h": "2"}
        for key, ratio in ratios.items():
            values.setdefault(key, values["input"] * decimal.Decimal(ratio))
        prices.append((model.strip().lower(), Price(**values)))
    return tuple(prices)



def check_pem_files(tls: TLSFiles, keys: tuple[str, str, str], fail: Callable[[str, str], ConfigError]) -> None:
    """Load the PEM files as TLS will, so that a wrong one is named now: gRPC only says it cannot listen
    (as if the port were taken), or fails each connection. `keys` name the cert, key and CA settings."""
    cert_key, key_key, ca_key = keys
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    for key, path in ((cert_key, tls.cert), (ca_key, tls.ca)):
        try:
            if path:
                context.load_verify_locations(path)
        except ssl.SSLError:
            raise fail(key, f"{path} holds no PEM certificate") from None
        except OSError as exc:
            raise fail(key, f"cannot read {path}: {exc.strerror}") from None
    try:
        if tls.cert:  # an empty password: an encrypted key fails here rather than prompting for a passphrase
            context.load_cert_chain(tls.cert, tls.key, password=b"")
    except ssl.SSLError as exc:
        mismatch = exc.reason == "KEY_VALUES_MISMATCH"
        raise fail(key_key, f"{tls.key} does not match the certificate in {tls.cert}" if mismatch
                   else f"{tls.key} holds no unencrypted PEM private key") from None
    except OSError as exc:
        raise fail(key_key, f"cannot read {tls.key}: {exc.strerror}") from None


def setting_values(file_data: dict, file_label: str, args: argparse.Namespace,
                   environ: dict[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Each setting's value as written, and where it was written ('default', the file and key, the flag, the
    variable): defaults < file < environment < flags, a setting most specific where it is given for one run."""
    values = {setting.key: setting.default for setting in SETTINGS}
    origin = dict.fromkeys(values, "default")
    keys_of = {section: [s.name for s in SETTINGS if s.section == section] for section in SECTIONS}
    for section, keys in file_data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{file_label}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
        if not isinstance(keys, dict):
            raise ConfigError(f"{file_label}: [{section}] must be a table of settings")
        if section == "pricing":  # keyed by model names, not settings of ccmon's
            values["pricing"], origin["pricing"] = keys, f"{file_label}: [pricing]"
            continue
        for key, value in flattened(keys).items():
            if key not in keys_of[section]:
                raise ConfigError(f"{file_label}: unknown key {section}.{key} "
                                  f"(known in [{section}]: {', '.join(keys_of[section])})")
            values[f"{section}.{key}"], origin[f"{section}.{key}"] = value, f"{file_label}: {section}.{key}"
    for setting in SETTINGS:
        given = getattr(args, setting.dest, None)  # a command shows only the flags of its own scopes
        source, value = (setting.label, given) if given is not None else (setting.env, environ.get(setting.env or ""))
        if value is None:
            continue
        if value == "" and setting.env:  # usually a variable that was not set, not a wish for none (a file's "" is)
            instead = f"leave {setting.label} out" if source == setting.label else f"unset {setting.env}"
            noun = setting.metavar.lower()
            raise ConfigError(f"{source}: the {noun} is empty; give a {noun}, or {instead} for none")
        values[setting.key], origin[setting.key] = value, source
    return values, origin


def validate_config(values: dict[str, Any], origin: dict[str, str], source: str) -> Config:
    """Read every setting (an error names it and where it was written), then check what several say together."""
    read = {}
    for setting in SETTINGS:
        try:
            read[setting.key] = setting.read(values[setting.key])
        except ValueError as exc:
            raise ConfigError(f"{origin[setting.key]}: {exc}") from None

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{origin[key]}: {problem}")

    server_tls = TLSFiles(read["server.tls_cert"], read["server.tls_key"], read["server.tls_client_ca"])
    if bool(server_tls.cert) != bool(server_tls.key):
        raise fail("server.tls_cert" if server_tls.cert else "server.tls_key",
                   "TLS needs both server.tls_cert and server.tls_key")
    if server_tls.ca and not server_tls.cert:
        raise fail("server.tls_client_ca", "mutual TLS needs server.tls_cert and server.tls_key too")
    monitor_tls = TLSFiles(read["monitor.tls_cert"], read["monitor.tls_key"], read["monitor.tls_ca"])
    if bool(monitor_tls.cert) != bool(monitor_tls.key):
        raise fail("monitor.tls_cert" if monitor_tls.cert else "monitor.tls_key",
                   "a client certificate needs both monitor.tls_cert and monitor.tls_key")
    check_pem_files(server_tls, ("server.tls_cert", "server.tls_key", "server.tls_client_ca"), fail)
    check_pem_files(monitor_tls, ("monitor.tls_cert", "monitor.tls_key", "monitor.tls_ca"), fail)
    wants_tls = read["monitor.server"].lower().startswith("https://") or any(dataclasses.astuple(monitor_tls))
    return Config(
        **{setting.field: read[setting.key] for setting in SETTINGS if setting.field},
        server_tls=server_tls if server_tls.cert else None,
        monitor_tls=monitor_tls if wants_tls else None,
        source=source,
        monitor_server_given=origin["monitor.server"] != "default",
        pricing=parse_pricing(values.get("pricing", {}), origin.get("pricing", "[pricing]")),
        figure_settings=tuple((setting.key, values[setting.key]) for setting in SETTINGS
                              if setting.scope in FIGURE_SCOPES and values[setting.key] != setting.default),
        server_flags=tuple((setting, os.path.abspath(read[setting.key]) if isinstance(read[setting.key], Path)
                            else values[setting.key]) for setting in SETTINGS
                           if setting.scope == "server" and (origin[setting.key] == setting.label or isinstance(
                               read[setting.key], Path) and not read[setting.key].is_absolute())),
    )


def load_config(args: argparse.Namespace, search_cwd: bool = True) -> Config:
    path, file_data = config_file_data(args.config, search_cwd)
    values, origin = setting_values(file_data, str(path), args, dict(os.environ))
    return validate_config(values, origin, str(path) if path else "defaults")


def figure_config(settings: dict[str, Any], source: str) -> Config:
    """The defaults with `settings` (of FIGURE_SCOPES only), as a client's figure_settings give them: the
    configuration a server works out that client's figures with."""
    known = {setting.key for setting in SETTINGS if setting.scope in FIGURE_SCOPES}
    if set(settings) - known:
        raise ConfigError(f"{source}: not the setting of a figure: {', '.join(sorted(set(settings) - known))[:200]}")
    values = {**{setting.key: setting.default for setting in SETTINGS}, **settings}
    return validate_config(values, {key: f"{source}: {key}" for key in values}, source)


def default_database_path() -> Path:
    """database.path's default, for this user: ~/.ccmon/ccmon.db."""
    return Path(next(setting.default for setting in SETTINGS if setting.key == "database.path")).expanduser()


def certificate_name(path: Path) -> str | None:
    """The first DNS name (else the common name) a PEM certificate is for."""
    try:
        decoded = ssl._ssl._test_decode_cert(str(path))  # the standard library's own PEM reader
    except (AttributeError, ssl.SSLError, OSError):
        return None
    names = [value for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]
    names += [value for rdn in decoded.get("subject", ()) for key, value in rdn if key == "commonName"]
    return names[0] if names else None


def client_config(config: Config) -> Config:
    """The server every client of this configuration talks to (the monitor, --format, --json, --health,
    statusline, report, import): the configured monitor server, else the server this configuration runs: its own
    address (a wildcard address means this machine), token and TLS. So a container's or a service unit's health
    check, reading the server's own configuration, follows its settings, and so does the monitor."""
    if config.monitor_server_given:
        return config
    host, port = parse_address(config.server_address, fail_as=ConfigError)
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    tls = None
    if config.server_tls:  # trust the server's own certificate, checked against the name it is for
        client = config.monitor_tls or TLSFiles()
        tls = TLSFiles(client.cert, client.key, client.ca or config.server_tls.cert,
                       certificate_name(config.server_tls.cert))
    return dataclasses.replace(config, monitor_server=f"{'https://' if tls else ''}{host}:{port}",
                               monitor_token=config.monitor_token or config.server_token, monitor_tls=tls)


# ---------------------------------------------------------------- Storage: schema, migrations, opening a database

USAGE_COLUMNS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens",
                 "cost_nanos", "duration_ms")
# requests.origin: where a row comes from. Stored, so a value keeps its meaning for ever.
ORIGIN_EVENT = 0            # an api_request event: Claude Code's own figures and cost (or a Codex response its
                            # turn's own cost priced)
ORIGIN_METRICS = 1          # derived from cost/token metrics: a session's usage, not requests (no request_id)
ORIGIN_TRANSCRIPT = 2       # read from a transcript, priced by ccmon (estimated)
ORIGIN_TRANSCRIPT_COST = 3  # read from a transcript with the cost Claude Code wrote in it
ORIGIN_EVENT_ESTIMATED = 4  # another agent's model-call event, priced by ccmon (estimated)
ORIGIN_METRICS_ESTIMATED = 5  # derived from another agent's token metrics, priced by ccmon (estimated)


@dataclasses.dataclass(frozen=True)
class OriginRule:
    """How the rows of one origin count, and which source wins: a row replaces the stored rows of a lower rank,
    usage (not requests) within its session and requests by its request_id; they are deleted when it arrives. A
    row is not stored where one replacing it, or a copy of it, is: metric usage in a session with requests, a
    transcript's request whose request_id is stored. The SQL selecting origins is rendered from ORIGIN_RULES by
    origin_in; migrations keep theirs literal, as it was when they were written.

    A new source (another agent, a new Claude Code event) is a constant above and its line in ORIGIN_RULES. Should
    that change the SQL the migrations wrote into the schema (the rollup triggers count REQUEST_ORIGINS, partial
    indexes select the metric and transcript origins), a new migration recreates it: a test compares them."""
    rank: int         # a row replaces the stored rows of a lower rank
    request: bool     # one API request with its request_id (else usage: not counted or listed as a request)
    transcript: bool  # read from a transcript, whose copies in forked sessions share the request_id


ORIGIN_RULES = {ORIGIN_EVENT: OriginRule(rank=2, request=True, transcript=False),
                ORIGIN_METRICS: OriginRule(rank=0, request=False, transcript=False),
                ORIGIN_TRANSCRIPT: OriginRule(rank=1, request=True, transcript=True),
                ORIGIN_TRANSCRIPT_COST: OriginRule(rank=1, request=True, transcript=True),
                ORIGIN_EVENT_ESTIMATED: OriginRule(rank=2, request=True, transcript=False),
                ORIGIN_METRICS_ESTIMATED: OriginRule(rank=0, request=False, transcript=False)}
AGENT_ESTIMATED_ORIGINS = frozenset((ORIGIN_EVENT_ESTIMATED, ORIGIN_METRICS_ESTIMATED))
EVENT_ORIGINS = frozenset((ORIGIN_EVENT, ORIGIN_EVENT_ESTIMATED))  # an agent's own telemetry of one call
REQUEST_ORIGINS = frozenset(origin for origin, policy in ORIGIN_RULES.items() if policy.request)
TRANSCRIPT_ORIGINS = frozenset(origin for origin, policy in ORIGIN_RULES.items() if policy.transcript)
AGENT_CALL_ORIGINS = EVENT_ORIGINS | TRANSCRIPT_ORIGINS  # one call, by telemetry or read from a history


def replaced_by(origin: int) -> frozenset[int]:
    """The origins whose stored rows a row of `origin` replaces (see OriginRule)."""
    return frozenset(other for other, policy in ORIGIN_RULES.items() if policy.rank < ORIGIN_RULES[origin].rank)


def origin_in(origins: Iterable[int], column: str = "origin") -> str:
    """SQL true for the rows of these origins, written as the partial indexes' conditions are (SQLite uses a
    partial index only for a query stating its condition): = one, != all but one, >= all from one on, else IN."""
    chosen = sorted(set(origins))
    others = sorted(set(ORIGIN_RULES) - set(chosen))
    if len(chosen) == 1:
        return f"{column} = {chosen[0]}"
    if len(others) == 1:
        return f"{column} != {others[0]}"
    if chosen and others and others[-1] < chosen[0]:
        return f"{column} >= {chosen[0]}"
    return f"{column} IN ({', '.join(map(str, chosen))})"


# What each rollup row keeps, and how one requests row ({r}: its alias) adds to it; after `rows`,
# in the order of Usage's fields.
FIGURES = {"rows": "1", "requests": f"({origin_in(REQUEST_ORIGINS, '{r}origin')})",
           **{c: "{r}" + c for c in USAGE_COLUMNS},
           "ttft_ms": "COALESCE({r}ttft_ms, 0)", "ttft_count": "({r}ttft_ms IS NOT NULL)"}
# The figures as schema versions 1-4, 5-6 and 7 on built their triggers: a migration's SQL keeps meaning what it did.
V1_FIGURES = {**FIGURES, "requests": "({r}origin = 0)"}
V5_FIGURES = {**FIGURES, "requests": "({r}origin != 1)"}
V8_FIGURES = {**FIGURES, "requests": "({r}origin IN (0, 2, 3, 4))"}
USAGE_SUMS = ", ".join(f"SUM({c})" for c in list(FIGURES)[1:])  # a rollup's figures as Usage(*...)
RAW_SUMS = ", ".join(f"SUM({e.format(r='')})" for e in list(FIGURES.values())[1:])  # the same over raw rows
ROW_FIGURES = ", ".join(e.format(r="r.") for e in list(FIGURES.values())[1:])  # one row (alias r) as Usage(*...)


def rollup_triggers(table: str, key: dict[str, str], extra: dict[str, tuple[str, str]] | None = None,
                    figures: dict[str, str] | None = None) -> str:
    """Triggers keeping `table` (keyed by `key`: column -> expression over a requests row) equal to the raw rows.
    `extra` columns are (value on insert, merge on conflict); `figures` default to FIGURES."""
    extra, figures = extra or {}, figures or FIGURES
    columns = [*key, *extra, *figures]
    inserted = [e.format(r="NEW.") for e in key.values()] + [v.format(r="NEW.") for v, _ in extra.values()] + \
        [e.format(r="NEW.") for e in figures.values()]
    merged = [m for _, m in extra.values()] + [f"{c} = {c} + excluded.{c}" for c in figures]
    match = " AND ".join(f"{c} = {e.format(r='OLD.')}" for c, e in key.items())
    return f"""
CREATE TRIGGER IF NOT EXISTS {table}_insert AFTER INSERT ON requests BEGIN
    INSERT INTO {table} ({", ".join(columns)}) VALUES ({", ".join(inserted)})
    ON CONFLICT ({", ".join(key)}) DO UPDATE SET {", ".join(merged)};
END;
CREATE TRIGGER IF NOT EXISTS {table}_delete AFTER DELETE ON requests BEGIN
    UPDATE {table} SET {", ".join(f"{c} = {c} - {e.format(r='OLD.')}" for c, e in figures.items())} WHERE {match};
    DELETE FROM {table} WHERE {match} AND rows = 0;
END;
"""


FIGURE_COLUMNS = ", ".join(f"{c} INTEGER NOT NULL" for c in FIGURES)


def usage_triggers(figures: dict[str, str]) -> str:
    """The triggers of usage_rollup and session_usage, adding up `figures`."""
    return rollup_triggers("usage_rollup", {"bucket": "{r}ts - {r}ts % " + str(BUCKET_MS), "model": "{r}model",
                                            "user": "{r}user"}, figures=figures) + \
        rollup_triggers("session_usage", {"session": "{r}session", "model": "{r}model"},
                        {"user": ("NEW.user", "user = excluded.user"),
                         "first_ts": ("NEW.ts", "first_ts = MIN(first_ts, excluded.first_ts)"),
                         "last_ts": ("NEW.ts", "last_ts = MAX(last_ts, excluded.last_ts)")}, figures=figures)



# The schema as version 1 (release 0.1.0) created it; MIGRATIONS take it from there.
SCHEMA = f"""
-- Values repeated across many rows are stored once and referenced by id (a row is ~150 bytes).
CREATE TABLE IF NOT EXISTS sessions (id INTEGER PRIMARY KEY, session_id TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS models (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);  -- '' when unknown
CREATE TABLE IF NOT EXISTS attribute_sets (
    id INTEGER PRIMARY KEY,
    attributes TEXT NOT NULL UNIQUE           -- canonical JSON object
);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,                      -- ms since the epoch, UTC
    session INTEGER NOT NULL REFERENCES sessions(id),
    seq INTEGER NOT NULL,                     -- event.sequence, or a negative hash of the record without one
    model INTEGER NOT NULL REFERENCES models(id),
    user INTEGER NOT NULL REFERENCES users(id),
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL,
    cache_creation_tokens INTEGER NOT NULL,
    cost_nanos INTEGER NOT NULL,              -- USD * 1e9
    duration_ms INTEGER NOT NULL,
    ttft_ms INTEGER,
    prompt_id TEXT,
    request_id TEXT,
    source INTEGER REFERENCES attribute_sets(id),  -- resource + who/where (user, organization, terminal)
    extra INTEGER REFERENCES attribute_sets(id),   -- the remaining record attributes
    origin INTEGER NOT NULL DEFAULT 0         -- 0: an api_request event; 1: derived from cost/token metrics
);
-- The de-duplication key leads with the timestamp, which also serves every period query.
CREATE UNIQUE INDEX IF NOT EXISTS requests_key ON requests(ts, session, seq);
CREATE INDEX IF NOT EXISTS requests_session ON requests(session, ts);
CREATE INDEX IF NOT EXISTS requests_from_metrics ON requests(session) WHERE origin = 1;  -- small: events win

-- Rollups kept equal to the raw rows by triggers: per 15 minutes (every timezone offset is a multiple
-- of it) and per session (total_hourly: see total_everyone); usage_daily per UTC day is recomputed
-- from usage_rollup by the writer.
CREATE TABLE IF NOT EXISTS usage_rollup (
    bucket INTEGER NOT NULL, model INTEGER NOT NULL, user INTEGER NOT NULL, {FIGURE_COLUMNS},
    PRIMARY KEY (bucket, model, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_daily (
    bucket INTEGER NOT NULL, model INTEGER NOT NULL, user INTEGER NOT NULL, {FIGURE_COLUMNS},
    PRIMARY KEY (bucket, model, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS session_usage (
    session INTEGER NOT NULL, model INTEGER NOT NULL, user INTEGER NOT NULL,
    first_ts INTEGER NOT NULL, last_ts INTEGER NOT NULL, {FIGURE_COLUMNS},
    PRIMARY KEY (session, model)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS session_usage_last ON session_usage(last_ts);
{{usage_triggers}}

CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,
    session INTEGER NOT NULL REFERENCES sessions(id),
    seq INTEGER NOT NULL,
    user INTEGER NOT NULL REFERENCES users(id),
    name TEXT NOT NULL,                       -- event name without the 'claude_code.' prefix
    prompt_id TEXT,
    source INTEGER REFERENCES attribute_sets(id),
    attributes TEXT NOT NULL                  -- JSON of the remaining attributes
);
CREATE UNIQUE INDEX IF NOT EXISTS events_key ON events(ts, session, seq);
CREATE INDEX IF NOT EXISTS events_name ON events(name, ts);
CREATE INDEX IF NOT EXISTS events_session ON events(session, ts);

CREATE TABLE IF NOT EXISTS metric_points (
    id INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,                      -- time_unix_nano in ms
    start_ts INTEGER,                         -- start_time_unix_nano in ms
    session INTEGER NOT NULL REFERENCES sessions(id),
    seq INTEGER NOT NULL,                     -- a negative hash of the point
    user INTEGER NOT NULL REFERENCES users(id),
    name TEXT NOT NULL,
    temporality INTEGER NOT NULL,             -- OTLP AggregationTemporality: 1 delta, 2 cumulative, 0 gauge
    value REAL NOT NULL,
    model TEXT,
    type TEXT,
    source INTEGER REFERENCES attribute_sets(id),
    attributes TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS metric_points_key ON metric_points(ts, session, seq);
CREATE INDEX IF NOT EXISTS metric_points_series ON metric_points(session, name, ts);
""".replace("{usage_triggers}", usage_triggers(V1_FIGURES))


def add_request_id_index(conn: sqlite3.Connection) -> None:
    """Version 2: requests can be found by Claude Code's request_id, the key telemetry shares with transcripts."""
    conn.execute("CREATE INDEX requests_request_id ON requests(request_id) WHERE request_id IS NOT NULL")


def rebuild_rollups(conn: sqlite3.Connection) -> None:
    """Recompute every rollup from the raw rows, as the triggers and the writer would have built them. (By FIGURES,
    also in migration 3: before version 5 every row has origin 0 or 1, which FIGURES and V1_FIGURES count alike.)"""
    sums = ", ".join(f"SUM({expression.format(r='')})" for expression in FIGURES.values())
    for table in ("usage_rollup", "usage_daily", "session_usage"):
        conn.execute(f"DELETE FROM {table}")
    conn.execute(f"INSERT INTO usage_rollup SELECT ts - ts % {BUCKET_MS}, model, user, {sums} FROM requests "
                 "GROUP BY 1, 2, 3")
    conn.execute(f"INSERT INTO usage_daily SELECT bucket - bucket % {DAY_MS}, model, user, "
                 f"{', '.join(f'SUM({column})' for column in FIGURES)} FROM usage_rollup GROUP BY 1, 2, 3")
    conn.execute(f"INSERT INTO session_usage SELECT session, model, (SELECT user FROM requests latest WHERE "
                 f"latest.session = r.session AND latest.model = r.model ORDER BY id DESC LIMIT 1), MIN(ts), "
                 f"MAX(ts), {sums} FROM requests r GROUP BY session, model")
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'total_hourly'").fetchone():  # version 13 on
        conn.execute("DELETE FROM total_hourly")
        conn.execute("DELETE FROM total_daily")
        conn.execute(f"INSERT INTO total_hourly SELECT ts - ts % {HOUR_MS}, model, {sums} FROM requests GROUP BY 1, 2")
        conn.execute(f"INSERT INTO total_daily SELECT bucket - bucket % {DAY_MS}, model, "
                     f"{', '.join(f'SUM({column})' for column in FIGURES)} FROM total_hourly GROUP BY 1, 2")


def name_users_readably(conn: sqlite3.Connection) -> None:
    """Version 3: a user is named by the most readable name a record or its resource has (see user_name), so
    an email set in OTEL_RESOURCE_ATTRIBUTES wins over the hashed user.id on every event. Rows stored under
    the hash move to the readable name (each row's source keeps the attributes to tell)."""
    conn.execute("CREATE TEMP TABLE renamed (source INTEGER PRIMARY KEY, user INTEGER NOT NULL)")
    sources = conn.execute("SELECT id, attributes FROM attribute_sets WHERE id IN (SELECT source FROM requests "
                           "UNION SELECT source FROM events UNION SELECT source FROM metric_points)").fetchall()
    for source, attributes in sources:
        name = user_name({}, json.loads(attributes))
        conn.execute("INSERT OR IGNORE INTO users (name) VALUES (?)", (name,))
        conn.execute("INSERT INTO renamed SELECT ?, id FROM users WHERE name = ?", (source, name))
    moved = 0
    for table in ("requests", "events", "metric_points"):
        moved += conn.execute(f"UPDATE {table} SET user = renamed.user FROM renamed WHERE renamed.source = "
                              f"{table}.source AND {table}.user != renamed.user").rowcount
    conn.execute("DROP TABLE renamed")
    if moved:
        rebuild_rollups(conn)


def keep_limit_readings(conn: sqlite3.Connection) -> None:
    """Version 4: what Claude Code's status line reports (Claude's own limits, the session's project) and each
    session's project. A reading names its session only: its user is the session's, once events arrive."""
    conn.execute("""CREATE TABLE limit_readings (
        id INTEGER PRIMARY KEY,
        ts INTEGER NOT NULL,                  -- when it was read, ms
        session INTEGER NOT NULL REFERENCES sessions(id),
        project TEXT,
        model TEXT,
        context_percent REAL,
        five_hour_percent REAL, five_hour_resets INTEGER,  -- resets: ms since the epoch
        seven_day_percent REAL, seven_day_resets INTEGER,
        spend_limit TEXT,                     -- JSON of a gateway's spend window
        version TEXT)""")
    conn.execute("CREATE INDEX limit_readings_session ON limit_readings(session, ts)")
    conn.execute("CREATE INDEX limit_readings_ts ON limit_readings(ts)")
    conn.execute("ALTER TABLE sessions ADD COLUMN project TEXT")


def count_imported_requests(conn: sqlite3.Connection) -> None:
    """Version 5: requests imported from Claude Code's transcripts (origin 2, priced by ccmon; 3, with the
    transcript's own costUSD) are requests: the rollup triggers count every row but metric-derived ones. No
    stored row has origin 2 or 3 yet, so the rollups stay as they are."""
    for table in ("usage_rollup", "session_usage"):
        conn.execute(f"DROP TRIGGER {table}_insert")
        conn.execute(f"DROP TRIGGER {table}_delete")
    for statement in re.split(r"(?<=END;)\n", usage_triggers(V5_FIGURES).strip()):
        conn.execute(statement)
    conn.execute("CREATE INDEX requests_imported ON requests(session) WHERE origin >= 2")


def find_request_ids_within_sessions(conn: sqlite3.Connection) -> None:
    """Version 6: a request_id is looked up within its session (Claude Code logs a request's api_request event and
    writes its transcript line under the same session id), and across sessions among imported rows only (a
    transcript's copies in other sessions). With one index over every request_id, each new row wrote to a random
    page of it: once the index outgrew the cache, that page write was most of an insert's cost. Now a new row goes
    next to its session's other rows."""
    conn.execute("DROP INDEX requests_request_id")
    conn.execute("CREATE INDEX requests_session_request ON requests(session, request_id) WHERE request_id IS NOT NULL")
    conn.execute("CREATE INDEX requests_imported_request ON requests(request_id) WHERE origin >= 2")


def count_receipts(conn: sqlite3.Connection) -> None:
    """Version 7: per receiver protocol and signal, when a record was last accepted and how many were accepted and
    rejected, ever (one upsert per export, in the transaction of its last rows: ccmon doctor's "last telemetry
    received", and counters that never go down)."""
    conn.execute("""CREATE TABLE receiver_counts (
        protocol TEXT NOT NULL,               -- grpc, http/protobuf, http/json
        signal TEXT NOT NULL,                 -- logs, metrics
        last_ms INTEGER,                      -- when a record was last accepted; NULL: never
        accepted INTEGER NOT NULL,
        rejected INTEGER NOT NULL,
        PRIMARY KEY (protocol, signal)) WITHOUT ROWID""")


def record_agents(conn: sqlite3.Connection) -> None:
    """Version 8: other coding agents (Gemini CLI, Codex, Qwen Code) besides Claude Code. Each request names its
    agent (interned in `agents`; every stored row is Claude Code's, id 1, the column's default, which SQLite
    keeps in the schema instead of writing it into each row), and so does each model: the rollups, by model,
    tell Claude Code's usage (which Claude's plans and limits count) from the other agents'. Two origins come:
    another agent's model-call event (4) and its token metrics (5), both priced by ccmon; the triggers count 4 as
    a request, and the partial indexes select the metric origins (1, 5), the transcript ones (2, 3) and the
    estimated agent rows (4, 5)."""
    conn.execute("CREATE TABLE agents (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)")
    conn.execute("INSERT INTO agents (id, name) VALUES (1, 'claude-code')")
    conn.execute("ALTER TABLE requests ADD COLUMN agent INTEGER NOT NULL DEFAULT 1")
    conn.execute("ALTER TABLE models ADD COLUMN agent INTEGER NOT NULL DEFAULT 1")  # whose model it is
    for table in ("usage_rollup", "session_usage"):
        conn.execute(f"DROP TRIGGER {table}_insert")
        conn.execute(f"DROP TRIGGER {table}_delete")
    for statement in re.split(r"(?<=END;)\n", usage_triggers(V8_FIGURES).strip()):
        conn.execute(statement)
    for index in ("requests_from_metrics", "requests_imported", "requests_imported_request"):
        conn.execute(f"DROP INDEX {index}")
    conn.execute("CREATE INDEX requests_from_metrics ON requests(session) WHERE origin IN (1, 5)")
    conn.execute("CREATE INDEX requests_imported ON requests(session) WHERE origin IN (2, 3)")
    conn.execute("CREATE INDEX requests_imported_request ON requests(request_id) WHERE origin IN (2, 3)")
    conn.execute("CREATE INDEX requests_estimated ON requests(session) WHERE origin >= 4")


def keep_counters_monotonic(conn: sqlite3.Connection) -> None:
    """Version 9: what the Prometheus counters need to never go down. Projects get ids in the order they are first
    named (a stable order: the first METRICS_LABELS of them get labels of their own), and retired_usage keeps, per
    counter series (user, model, project), what left the stored rows: rows retention deleted, and what a
    replacement or a move to another project or user took away (see Writer._keep_counters)."""
    conn.execute("CREATE TABLE projects (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)")
    conn.execute("INSERT INTO projects (name) SELECT project FROM sessions WHERE project IS NOT NULL GROUP BY project "
                 "ORDER BY MIN(id)")
    conn.execute("CREATE TRIGGER projects_named AFTER UPDATE OF project ON sessions WHEN NEW.project IS NOT NULL "
                 "BEGIN INSERT OR IGNORE INTO projects (name) VALUES (NEW.project); END")
    conn.execute(f"""CREATE TABLE retired_usage (
        user INTEGER NOT NULL, model INTEGER NOT NULL,
        project INTEGER NOT NULL,             -- projects.id; 0: sessions without a project
        {", ".join(f"{c} INTEGER NOT NULL" for c in list(FIGURES)[1:])},
        PRIMARY KEY (user, model, project)) WITHOUT ROWID""")


def mark_reading_agents(conn: sqlite3.Connection) -> None:
    """Version 10: a limit reading names whose limits it reads: Claude's, from Claude Code's status line (every
    stored reading, id 1, the default), or another agent's plan (Codex's 5-hour and weekly windows in its
    rollouts). Claude's limit figures, blocks and alerts read Claude's alone."""
    conn.execute("ALTER TABLE limit_readings ADD COLUMN agent INTEGER NOT NULL DEFAULT 1")


def number_metric_series(conn: sqlite3.Connection) -> None:
    """Version 11: every counter series (user, model, project id) gets a number in the order it first occurs (see
    counters_kept): only the first METRICS_SERIES of them get labels of their own, so one client sending a new
    user, model and project with every request cannot make Prometheus hold more. Series already stored are
    numbered by their ids (the first users' first)."""
    conn.execute("CREATE TABLE metric_series (id INTEGER PRIMARY KEY, user INTEGER NOT NULL, model INTEGER NOT NULL, "
                 "project INTEGER NOT NULL, UNIQUE (user, model, project))")
    conn.execute("INSERT INTO metric_series (user, model, project) SELECT su.user, su.model, COALESCE(p.id, 0) "
                 "FROM session_usage su JOIN sessions s ON s.id = su.session LEFT JOIN projects p ON p.name = s.project "
                 "UNION SELECT user, model, project FROM retired_usage ORDER BY 1, 2, 3")


def index_readings_by_agent(conn: sqlite3.Connection) -> None:
    """Version 12: each agent's limit readings found by time without reading the others' (Claude's status line
    writes one every turn; the metrics and the dashboard ask for each agent's)."""
    conn.execute("CREATE INDEX limit_readings_agent ON limit_readings(agent, ts)")


def total_everyone(conn: sqlite3.Connection) -> None:
    """Version 13: everyone's usage per hour and per UTC day, by model (total_hourly kept by triggers as usage_rollup
    is; total_daily recomputed from it by the writer, as usage_daily is). A chart of everyone's local days reads
    the UTC days and the hours between UTC and local midnights from them: a row per model instead of one per
    model and user, and per hour instead of per quarter hour (a year of Berlin's days: a third of the rows)."""
    for table in ("total_hourly", "total_daily"):
        conn.execute(f"CREATE TABLE {table} (bucket INTEGER NOT NULL, model INTEGER NOT NULL, {FIGURE_COLUMNS}, "
                     "PRIMARY KEY (bucket, model)) WITHOUT ROWID")
    triggers = rollup_triggers("total_hourly", {"bucket": "{r}ts - {r}ts % " + str(HOUR_MS), "model": "{r}model"},
                               figures=V8_FIGURES)
    for statement in re.split(r"(?<=END;)\n", triggers.strip()):
        conn.execute(statement)
    sums = ", ".join(f"SUM({column})" for column in FIGURES)
    conn.execute(f"INSERT INTO total_hourly SELECT bucket - bucket % {HOUR_MS}, model, {sums} FROM usage_rollup "
                 "GROUP BY 1, 2")
    conn.execute(f"INSERT INTO total_daily SELECT bucket - bucket % {DAY_MS}, model, {sums} FROM total_hourly "
                 "GROUP BY 1, 2")


def sum_rollups_per_transaction(conn: sqlite3.Connection) -> None:
    """Version 14: usage_rollup, total_hourly and session_usage are no longer kept by triggers, an upsert per row
    on each, but by the writer, from the rows it added and removed (see settle_rollups), before each COMMIT and
    before it reads session_usage; usage_daily and total_daily the same way instead of recomputed a day at a time.
    Rows that imports and backfills spread over many keys made each trigger's upsert a random page write; summed
    per key, each key is written once a transaction."""
    for table in ("usage_rollup", "total_hourly", "session_usage"):
        conn.execute(f"DROP TRIGGER {table}_insert")
        conn.execute(f"DROP TRIGGER {table}_delete")


def drop_session_request_index(conn: sqlite3.Connection) -> None:
    """Version 15: an import finds the request_ids its sessions have stored by reading each session's rows once per
    chunk (see session_request_ids), not by an index of every row's request_id: the largest of the indexes each new
    row writes a random page of when exports come out of time order (a backfill), a fifth of a million-row one's
    time (BENCHMARKS.md), and about 40 bytes a row."""
    conn.execute("DROP INDEX requests_session_request")


def stage_bulk_requests(conn: sqlite3.Connection) -> None:
    """Version 16: pending_requests, where the api_request events of a large export wait, acknowledged, until the
    writer applies many exports' at once to requests, its indexes and the rollups (see STAGE_MIN_REQUESTS): a
    backfill's records land on random pages of those, which a transaction of one or two exports wrote once per few
    records, and a transaction of tens of thousands once per many (BENCHMARKS.md). Its columns are the requests
    table's, with the ids the writer interned."""
    conn.execute("CREATE TABLE pending_requests (ts INTEGER NOT NULL, session INTEGER NOT NULL, seq INTEGER NOT NULL, "
                 "model INTEGER NOT NULL, user INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER "
                 "NOT NULL, cache_read_tokens INTEGER NOT NULL, cache_creation_tokens INTEGER NOT NULL, cost_nanos "
                 "INTEGER NOT NULL, duration_ms INTEGER NOT NULL, ttft_ms INTEGER, prompt_id TEXT, request_id TEXT, "
                 "source INTEGER, extra INTEGER, origin INTEGER NOT NULL, agent INTEGER NOT NULL)")


def log_waiting_exports(conn: sqlite3.Connection) -> None:
    """Version 17: the exports that wait wait in a log beside the database (see WaitingLog), and pending_requests only
    holds them within the transaction applying them. waiting_log: the id the log's files carry (files of another
    database are not applied), and the last frame applied, in the transaction that applied it."""
    conn.execute("CREATE TABLE waiting_log (id INTEGER NOT NULL, applied INTEGER NOT NULL)")
    conn.execute("INSERT INTO waiting_log VALUES (random() & 9223372036854775807, 0)")


# MIGRATIONS[i] takes a database from schema version i + 1 to i + 2, inside one transaction with the
# version bump. New databases are created at version 1 by SCHEMA and go through the same steps.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [add_request_id_index, name_users_readably,
                                                          keep_limit_readings, count_imported_requests,
                                                          find_request_ids_within_sessions, count_receipts,
                                                          record_agents, keep_counters_monotonic,
                                                          mark_reading_agents, number_metric_series,
                                                          index_readings_by_agent, total_everyone,
                                                          sum_rollups_per_transaction, drop_session_request_index,
                                                          stage_bulk_requests, log_waiting_exports]
SCHEMA_VERSION = 1 + len(MIGRATIONS)


class StorageError(Exception):
    """The database cannot be opened (wrong file, no permission, corrupt, failed upgrade): fatal at start."""


class DatabaseMoved(Exception):
    """The file the server opened is no longer at its path: a read would find another file, or none."""


class StorageUnavailable(Exception):
    """The database cannot take writes right now (locked, disk full, read-only, queue full): retryable."""

    def __init__(self, message: str, retry_after_s: int = 5):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def connect(path: Path, readonly: bool = False, busy_ms: int = 5000,
            factory: type[sqlite3.Connection] = sqlite3.Connection) -> sqlite3.Connection:
    """A connection; a read-only one (mode=ro) never creates a file where the database is not."""
    where = f"{Path(os.path.abspath(path)).as_uri()}?mode=ro" if readonly else path
    conn = sqlite3.connect(where, isolation_level=None, check_same_thread=False, timeout=busy_ms / 1000,
                           uri=readonly, factory=factory)
    conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
    if readonly:
        conn.execute("PRAGMA query_only = 1")
    return conn


def create_private(path: Path) -> bool:
    """Create an empty file readable by its owner only (SQLite gives its -wal and -shm files the same mode);
    False when it already existed."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    return True


def flock_holder(handle) -> str:
    """The pid holding an flock on this open file, from /proc/locks (Linux), else 'unknown'."""
    info = os.fstat(handle.fileno())
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and device in fields:
                return fields[fields.index(device) - 1]
    except OSError:
        pass
    return "unknown"


class DatabaseFile:
    """The file a server writes, held open for as long as it runs: locked so that one server writes it
    (by whatever path, symlink or hard link it is reached), and checked to still be the file at its path."""

    def __init__(self, path: Path):
        self.path = path
        self.created = create_private(Path(os.path.realpath(path)))  # a symlink's file, even one not there yet
        if not stat.S_ISREG(os.stat(path).st_mode):  # before opening it: opening a FIFO would wait for a writer
            kind = "a folder" if os.path.isdir(path) else "not a regular file"
            raise StorageError(f"{path} is {kind}; --database-path (database.path) names ccmon's database file, "
                               "created when missing")
        self._handle = open(path, "rb")
        try:
            import fcntl  # an flock, not SQLite's own fcntl locks: the two never interfere on a local disk
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = flock_holder(self._handle)
            self._handle.close()
            raise StorageError(f"another ccmon server (pid {owner}) is already using {path}; stop it or choose "
                               "another --database-path") from None
        self._identities = {path: self._identity(os.fstat(self._handle.fileno()))}
        self._take_legacy_lock()

    def moved(self) -> str:
        """'' while the database file is still the one at its path, else what happened to it."""
        return self._changed({self.path: self._identities[self.path]})

    def _take_legacy_lock(self) -> None:
        """Releases of schema 1 locked `ccmon.db.lock` instead: one may still be running on this database."""
        import fcntl
        legacy = self.path.with_name(self.path.name + ".lock")
        try:
            handle = open(legacy, "r")
        except OSError:
            return  # none (or not ours to read): nothing from an older release to wait for
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.close()
                raise StorageError(f"an older ccmon server (pid {handle.read().strip() or 'unknown'}) is using "
                                   f"{self.path}; stop it first") from None
            legacy.unlink(missing_ok=True)

    @staticmethod
    def _identity(info: os.stat_result) -> tuple[int, int]:
        return info.st_dev, info.st_ino

    def watch(self, companion: Path) -> None:
        """Also check `companion` (the -wal file), which SQLite keeps as long as the writer is open."""
        self._identities[companion] = self._identity(os.stat(companion))

    def replaced(self) -> str:
        """'' while every watched file is still the one at its path, else what happened to the first that is not."""
        return self._changed(self._identities)

    @classmethod
    def _changed(cls, identities: dict[Path, tuple[int, int]]) -> str:
        for path, identity in identities.items():
            try:
                if cls._identity(os.stat(path)) != identity:
                    return f"{path} was replaced by another file"
            except FileNotFoundError:
                return f"{path} was moved or deleted"
            except OSError as exc:
                return f"{path} cannot be checked: {exc.strerror}"
        return ""

    def close(self) -> None:
        self._handle.close()


def recovery_advice(path: Path) -> str:
    return (f"keep {path} as it is, and restore a backup, or recover what SQLite can still read with: "
            f"sqlite3 {path} .recover | sqlite3 recovered.db")


def fresh_start_advice(path: Path) -> str:
    """What to do with a database ccmon cannot read: its newest upgrade backup back in place, else a new one."""
    try:
        backups = sorted((found for found in path.parent.iterdir()
                          if re.fullmatch(re.escape(path.name) + r"\.v\d+\.bak", found.name)),
                         key=lambda backup: backup.stat().st_mtime)
    except OSError:
        backups = []
    keep = f"move {path} aside (keep it: sqlite3 may still recover rows from it)"
    if backups:
        return f"{keep} and restore the newest backup, {backups[-1]}, in its place"
    return f"{keep} to start a new database there"


def is_damage(exc: sqlite3.Error, kinds: tuple[int, ...] = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)) -> bool:
    """The file is damaged, not busy: retrying will not help."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in kinds


def quick_check(conn: sqlite3.Connection) -> str:
    """'' for a sound database, else SQLite's first complaint."""
    problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
    return "" if problems == ["ok"] else "; ".join(problems)


def backup_copy(conn: sqlite3.Connection, version: int) -> Path:
    """A consistent copy of the database beside it (SQLite's backup API), readable by its owner only."""
    database = Path(conn.execute("PRAGMA database_list").fetchone()[2])
    target = database.with_name(f"{database.name}.v{version}.bak")
    target.unlink(missing_ok=True)
    create_private(target)
    with sqlite3.connect(target) as copy:
        conn.backup(copy)
    copy.close()
    return target


def upgrade(conn: sqlite3.Connection, version: int) -> None:
    """Run MIGRATIONS from `version` to the current schema, all in one transaction: all or nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for step in range(version, SCHEMA_VERSION):
            MIGRATIONS[step - 1](conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (a full disk): keep the real error
            conn.execute("ROLLBACK")
        raise


WRITER_BUSY_MS = 2000  # short: a locked database answers exporters "retry later" within 10 s


def open_database(path: Path) -> sqlite3.Connection:
    """The write connection to a sound database of the current schema: created at version 1 and brought up to
    date, or upgraded after a backup copy is written beside it. Anything else is a StorageError in one line."""
    try:
        conn = connect(path, busy_ms=WRITER_BUSY_MS)
    except sqlite3.Error as exc:  # not a file SQLite can use at all (/proc/self/mem, a device)
        raise StorageError(f"cannot use {path} as ccmon's database: {exc}") from None
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version > SCHEMA_VERSION:
            raise StorageError(f"{path} was written by a newer ccmon (schema {version}); upgrade ccmon")
        if version < 0:  # no ccmon writes one: not something to migrate, or to copy as a backup
            raise StorageError(f"{path} has schema version {version}, which no ccmon writes; "
                               f"{fresh_start_advice(path)}")
        if tables and "requests" not in tables:
            raise StorageError(f"{path} is an SQLite database of something else, not ccmon's; "
                               "choose another --database-path")
        problem = quick_check(conn) if tables else ""
        if problem:
            raise StorageError(f"{path} is damaged ({problem}); {recovery_advice(path)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")  # a commit is on disk before the exporter hears "ok"
        if not tables or version == 0:  # new, or left by a schema-1 release stopped before it numbered its schema
            conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA}; PRAGMA user_version = 1; COMMIT;")
            version = 1
        if not tables:
            upgrade(conn, 1)
        elif version < SCHEMA_VERSION:
            backup = backup_copy(conn, version)
            log.info("upgrading %s from schema %d to %d; a copy of the old database is at %s", path, version,
                     SCHEMA_VERSION, backup)
            try:
                upgrade(conn, version)
            except Exception as exc:
                raise StorageError(f"cannot upgrade {path} from schema {version} to {SCHEMA_VERSION} ({exc}); the "
                                   f"database is unchanged and a copy is at {backup}") from None
    except sqlite3.DatabaseError as exc:
        conn.close()
        if is_damage(exc, (sqlite3.SQLITE_CORRUPT,)):  # not SQLITE_NOTADB: that is some other kind of file
            raise StorageError(f"{path} is damaged ({exc}); {recovery_advice(path)}") from None
        if is_damage(exc, (sqlite3.SQLITE_NOTADB,)):  # another kind of file, or ccmon's with its header destroyed
            raise StorageError(f"{path} is not an SQLite database ({exc}); if it was ccmon's, "
                               f"{fresh_start_advice(path)}") from None
        raise StorageError(f"cannot use {path} as ccmon's database: {exc}") from None
    except StorageError:
        conn.close()
        raise
    return conn


# ---------------------------------------------------------------- Storage: the single writer

# Rows arrive from ingestion with text where the tables hold ids; the writer resolves them.
# Each insert names its columns; the Batch row tuples follow the same order.
REQUEST_COLUMNS = ("ts", "session", "seq", "model", "user", *USAGE_COLUMNS, "ttft_ms", "prompt_id", "request_id",
                   "source", "extra", "origin", "agent")
EVENT_COLUMNS = ("ts", "session", "seq", "user", "name", "prompt_id", "source", "attributes")
METRIC_COLUMNS = ("ts", "start_ts", "session", "seq", "user", "name", "temporality", "value", "model", "type",
                  "source", "attributes")
SHARED = {"session": ("sessions", "session_id"), "source": ("attribute_sets", "attributes"),
          "user": ("users", "name")}
INTERNED = {"requests": {**SHARED, "model": ("models", "name"), "extra": ("attribute_sets", "attributes"),
                         "agent": ("agents", "name")},
            "events": SHARED, "metric_points": SHARED}
READING_COLUMNS = ("ts", "session", "project", "model", "context_percent", "five_hour_percent", "five_hour_resets",
                   "seven_day_percent", "seven_day_resets", "spend_limit", "version", "agent")
RETENTION_TABLES = ("requests", "events", "metric_points", "limit_readings")
CLAUDE_AGENT_ID = 1  # Claude Code's id in `agents` (record_agents), the agent of Claude's own limit readings
SWEEP_CHUNK = 5000
COPY_WINDOW_MS = 10 * 60_000  # a telemetry event and the transcript line of the same answer are this close
# A record with no time at all is stored at the time received, where a re-send of it would be a new key (ts,
# session, seq). Ingestion gives it a seq at or below UNDATED_SEQ, a hash of its content, and the writer skips it
# when its session has that seq among rows stored up to RESEND_WINDOW_MS before (exporters retry for a minute
# or so; a collector's queue may hold an export for hours).
UNDATED_SEQ = -(2 ** 62) - 1
RESEND_WINDOW_MS = DAY_MS


@dataclasses.dataclass
class Batch:
    """Rows decoded from one Export, written in one go, as tuples in REQUEST/EVENT/METRIC_COLUMNS order."""
    requests: list[tuple] = dataclasses.field(default_factory=list)
    events: list[tuple] = dataclasses.field(default_factory=list)
    metrics: list[tuple] = dataclasses.field(default_factory=list)
    projects: dict[str, str] = dataclasses.field(default_factory=dict)  # session id -> project its resource names
    receipt: ReceiverCounts | None = None  # the export's counts, on its last batch (see Receiver.receive)
    turn_costs: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)  # Codex's: (conversation, turn
    # id, nano-dollars), stored as events too

    def __len__(self) -> int:
        return len(self.requests) + len(self.events) + len(self.metrics)


# What one api_request, or one metric data point as usage, can claim. A context window holds at most a million
# tokens, and the dearest call yet (a million tokens in, 128k out, at the dearest prices, $30 and $150 per
# million) costs about $50: the caps leave a thousand times that in tokens, twenty in cost; Claude Code gives up
# on a call after minutes, and sends its metric points every minute. The caps are what keeps sums exact in
# SQLite's int64 (9.22e18): at the caps, a sum of costs (1e12 nano-dollars each) reaches it only past 9.2
# million records ($9.2 billion) in one query's range or rollup row, one of tokens (4e9 per record, all kinds)
# past 2.3 billion, one of durations (8.64e7 ms) past 1e11; at Claude Code's real figures ($0.05, 50k tokens a
# call) a hundred thousand times later still.
MAX_REQUEST_TOKENS = 10 ** 9  # of each kind
MAX_REQUEST_USD = 1_000
MAX_REQUEST_MS = DAY_MS       # duration_ms and ttft_ms
TOKEN_KEYS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens")

# Metric data points that are usage: (metric name, its type) -> (the agent, what each unit of it adds to which
# requests columns). The other agents count input with the cache in it: a cache point moves its tokens from input
# to the cache kind (the points of one export share their time). Gemini's thoughts are output, its tool-use prompt
# input; Qwen's thoughts and Codex's reasoning are in their output already, and Codex's total is the sum.
METRIC_USAGE_FIELDS = {("claude_code.cost.usage", None): (CLAUDE_CODE, {"cost_nanos": 1}),
                       ("claude_code.token.usage", "input"): (CLAUDE_CODE, {"input_tokens": 1}),
                       ("claude_code.token.usage", "output"): (CLAUDE_CODE, {"output_tokens": 1}),
                       ("claude_code.token.usage", "cacheRead"): (CLAUDE_CODE, {"cache_read_tokens": 1}),
                       ("claude_code.token.usage", "cacheCreation"): (CLAUDE_CODE, {"cache_creation_tokens": 1}),
                       ("gemini_cli.token.usage", "input"): (GEMINI_CLI, {"input_tokens": 1}),
                       ("gemini_cli.token.usage", "cache"): (GEMINI_CLI, {"cache_read_tokens": 1, "input_tokens": -1}),
                       ("gemini_cli.token.usage", "tool"): (GEMINI_CLI, {"input_tokens": 1}),
                       ("gemini_cli.token.usage", "output"): (GEMINI_CLI, {"output_tokens": 1}),
                       ("gemini_cli.token.usage", "thought"): (GEMINI_CLI, {"output_tokens": 1}),
                       ("qwen-code.token.usage", "input"): (QWEN_CODE, {"input_tokens": 1}),
                       ("qwen-code.token.usage", "cache"): (QWEN_CODE, {"cache_read_tokens": 1, "input_tokens": -1}),
                       ("qwen-code.token.usage", "output"): (QWEN_CODE, {"output_tokens": 1}),
                       ("codex.turn.token_usage", "input"): (CODEX, {"input_tokens": 1}),
                       ("codex.turn.token_usage", "cached_input"): (CODEX, {"cache_read_tokens": 1,
                                                                           "input_tokens": -1}),
                       ("codex.turn.token_usage", "cache_write_input"): (CODEX, {"cache_creation_tokens": 1,
                                                                                "input_tokens": -1}),
                       ("codex.turn.token_usage", "output"): (CODEX, {"output_tokens": 1})}
# Codex's token metric, and Qwen's by default, name no session: their usage counts in a session of the agent's
# metrics per user, unless the agent's events of that user are stored within this long of it (they win, as
# events do within a session; the metrics' points come at the end of a run, or every minute or so).
METRICS_SESSION_WINDOW_MS = HOUR_MS


def metrics_session(agent: str, user: str) -> str:
    """The session holding an agent's usage from metrics that name no session (see METRICS_SESSION_WINDOW_MS)."""
    return f"{agent} metrics" + (f" of {user}" if user else "")


# Whether request_id ?R is stored among imported rows, in any session (an index search). Within its own session a
# request_id is looked up in session_request_ids (telemetry and transcripts name it alike); a copy in a forked
# session of an answer telemetry stored is found by a CopyWindow.
REQUEST_ID_IMPORTED = f"EXISTS (SELECT 1 FROM requests WHERE request_id = ?R AND {origin_in(TRANSCRIPT_ORIGINS)})"
# Within its session, a request_id is looked for this far either side of the imported rows' times: a telemetry event
# and the transcript line of the same answer are seconds apart (hours where a clock ahead had telemetry re-dated on
# arrival), and a session's rows beyond would be read again for every chunk of a long session.
SESSION_REQUEST_ID_MS = DAY_MS


def session_request_ids(conn: sqlite3.Connection, times: Iterable[tuple[int, int]]) -> set[tuple[int, str]]:
    """(session, request_id) of the stored rows that have one, in the sessions of these (time, session id) within
    SESSION_REQUEST_ID_MS of their times: one range of each session's rows (requests_session) for a chunk of an
    import, instead of an index over every row's request_id that each new row wrote a random page of (version
    15)."""
    spans: dict[int, tuple[int, int]] = {}
    for ts, session in times:
        first, last = spans.get(session, (ts, ts))
        spans[session] = min(first, ts), max(last, ts)
    found: set[tuple[int, str]] = set()
    for session, (first, last) in spans.items():
        found.update(conn.execute("SELECT session, request_id FROM requests WHERE session = ? AND ts >= ? AND ts <= ? "
                                  "AND request_id IS NOT NULL",
                                  (session, first - SESSION_REQUEST_ID_MS, last + SESSION_REQUEST_ID_MS)))
    return found
# Whether the session named ?1 has telemetry of the agent named ?2 (a history row of JOINED_BY_SESSION's agents is
# then known).
SESSION_HAS_TELEMETRY = ("SELECT 1 FROM requests r JOIN sessions s ON s.id = r.session JOIN agents a ON a.id = r.agent "
                         f"WHERE s.session_id = ?1 AND a.name = ?2 AND {origin_in(EVENT_ORIGINS, 'r.origin')} LIMIT 1")
# A session's rows imported from its agent's history, which that agent's telemetry of the session replaces.
SESSION_HISTORY_REPLACED = ("DELETE FROM requests WHERE session = (SELECT id FROM sessions WHERE session_id = ?1) AND "
                            f"agent = (SELECT id FROM agents WHERE name = ?2) AND {origin_in(TRANSCRIPT_ORIGINS)}")


def joined_by_session(conn: sqlite3.Connection, rows: Iterable[tuple]) -> set[tuple[str, str]]:
    """The (session, agent) pairs of these REQUEST_COLUMNS rows whose agent's history is joined to its telemetry by
    session (JOINED_BY_SESSION), and whose session has that telemetry stored."""
    agent = REQUEST_COLUMNS.index("agent")
    pairs = {(row[1], row[agent]) for row in rows if row[agent] in JOINED_BY_SESSION}
    return {pair for pair in pairs if conn.execute(SESSION_HAS_TELEMETRY, pair).fetchone()}


IMPORT_CHUNK = 2000       # imported rows written in one transaction: telemetry waits for one chunk at most
                          # (about 50 ms; half as many commits as 1,000 cost an import 5 % less)
COPY_SCAN_CHUNK = 20_000  # stored rows a CopyWindow reads in one transaction


class ImportInterrupted(StorageUnavailable):
    """An import stopped after some of its chunks were stored."""

    def __init__(self, stored: ImportCounts, total: int, cause: StorageUnavailable):
        super().__init__(f"{stored.imported + stored.already_known:,} of the {total:,} requests were stored or "
                         f"found known ({stored.imported:,} new), then: {cause}", cause.retry_after_s)
        self.stored = stored


class CopyWindow:
    """The request_ids stored by telemetry (not imported) within COPY_WINDOW_MS of some imported rows' times: a
    transcript's copy of such an answer in a forked session keeps the answer's time, not its session. Read in one
    pass over each stretch of time the rows cover (a query per row visited every row near its time: the square of
    the rows when they are dense); the writer adds the telemetry it stores while an import is under way."""

    def __init__(self, rows: Iterable[tuple]):
        """`rows` in REQUEST_COLUMNS order."""
        request_id = REQUEST_COLUMNS.index("request_id")
        times = sorted((row[0], row[request_id]) for row in rows if row[request_id] is not None)
        self.wanted = {rid for _, rid in times}
        self.spans: list[list[int]] = []  # [first ms, last ms], apart and in order
        for ts, _ in times:
            if self.spans and ts - COPY_WINDOW_MS <= self.spans[-1][1]:
                self.spans[-1][1] = ts + COPY_WINDOW_MS
            else:
                self.spans.append([ts - COPY_WINDOW_MS, ts + COPY_WINDOW_MS])
        self.stored: dict[str, set[int]] = {}
        self._after: tuple | None = None  # the key (ts, session, seq) read last in spans[0]

    def add(self, request_id: str | None, ts: int) -> None:
        if request_id in self.wanted:
            self.stored.setdefault(request_id, set()).add(ts)

    def read(self, conn: sqlite3.Connection, limit: int | None = None) -> bool:
        """Read up to `limit` stored rows of the spans, from where the last read stopped; True once all are read."""
        while self.spans:
            first, last = self.spans[0]
            where, params = ("(ts, session, seq) > (?, ?, ?)", self._after) if self._after else ("ts >= ?", (first,))
            rows = conn.execute(f"SELECT ts, session, seq, request_id, origin FROM requests WHERE {where} AND "
                                f"ts <= ? ORDER BY ts, session, seq{f' LIMIT {limit}' if limit else ''}",
                                (*params, last)).fetchall()
            for ts, _, _, request_id, origin in rows:
                if origin not in TRANSCRIPT_ORIGINS:  # imported rows are found by REQUEST_ID_IMPORTED
                    self.add(request_id, ts)
            if limit and len(rows) == limit:
                self._after = rows[-1][:3]
                return False
            self.spans.pop(0)
            self._after = None
        return True

    def has(self, request_id: str | None, ts: int) -> bool:
        return any(abs(stored - ts) <= COPY_WINDOW_MS for stored in self.stored.get(request_id, ()))


# The rollups the writer adds each transaction's changed rows to (see settle_rollups), table -> its key as expressions
# over changed_sums: the changed rows summed by quarter hour (BUCKET_MS), model and user first, once, since every
# coarser bucket is a union of quarter hours. session_usage, which keeps more than sums, is added to from the rows.
SUMMED_ROLLUPS = {"usage_rollup": {"bucket": "bucket", "model": "model", "user": "user"},
                  "usage_daily": {"bucket": f"bucket - bucket % {DAY_MS}", "model": "model", "user": "user"},
                  "total_hourly": {"bucket": f"bucket - bucket % {HOUR_MS}", "model": "model"},
                  "total_daily": {"bucket": f"bucket - bucket % {DAY_MS}", "model": "model"}}
# session_usage from the rows noted since it was last settled (those after sessions_settled.upto): under the user
# of the latest row added (0 when none was: the key's user stays), from its first to its last row's time (a removed
# row's time lies within them already); the keys left without rows deleted (a key's rows fall to 0 only by a
# negative sum). counters_kept settles it alone, before and after each job that may change a session's usage.
NOTED_SINCE_SETTLED = "changed_requests WHERE rowid > (SELECT upto FROM sessions_settled)"
SETTLE_SESSIONS = [
    f"INSERT INTO session_usage (session, model, user, first_ts, last_ts, {', '.join(FIGURES)}) SELECT g.session, "
    f"g.model, COALESCE(latest.user, 0), g.first_ts, g.last_ts, {', '.join(f'g.{c}' for c in FIGURES)} FROM (SELECT "
    f"session, model, MAX(IIF(rows > 0, rowid, NULL)) AS latest, MIN(ts) AS first_ts, MAX(ts) AS last_ts, "
    f"{', '.join(f'SUM({c}) AS {c}' for c in FIGURES)} FROM {NOTED_SINCE_SETTLED} GROUP BY session, model) g "
    "LEFT JOIN changed_requests latest ON latest.rowid = g.latest WHERE true ON CONFLICT (session, model) DO UPDATE "
    "SET user = IIF(excluded.user = 0, user, excluded.user), first_ts = MIN(first_ts, excluded.first_ts), "
    f"last_ts = MAX(last_ts, excluded.last_ts), {', '.join(f'{c} = {c} + excluded.{c}' for c in FIGURES)}",
    f"DELETE FROM session_usage WHERE rows = 0 AND (session, model) IN (SELECT session, model FROM "
    f"{NOTED_SINCE_SETTLED} AND rows < 0)",
    "UPDATE sessions_settled SET upto = (SELECT COALESCE(MAX(rowid), 0) FROM changed_requests)"]
SETTLE_ROLLUPS = [
    *SETTLE_SESSIONS,
    f"INSERT INTO changed_sums SELECT ts - ts % {BUCKET_MS}, model, user, {', '.join(f'SUM({c})' for c in FIGURES)} "
    "FROM changed_requests GROUP BY 1, 2, 3",
    *(f"INSERT INTO {table} ({', '.join([*key, *FIGURES])}) SELECT {', '.join(key.values())}, "
      f"{', '.join(f'SUM({c})' for c in FIGURES)} FROM changed_sums WHERE true GROUP BY "
      f"{', '.join(map(str, range(1, len(key) + 1)))} ON CONFLICT ({', '.join(key)}) DO UPDATE SET "
      f"{', '.join(f'{c} = {c} + excluded.{c}' for c in FIGURES)}" for table, key in SUMMED_ROLLUPS.items()),
    # the keys left without rows: among those the transaction removed rows from (summed to 0 or less; 0 for a key it
    # made and emptied, which the upsert above has just made as a row of zeros)
    *(f"DELETE FROM {table} WHERE rows = 0 AND ({', '.join(key)}) IN (SELECT {', '.join(key.values())} FROM "
      "changed_sums WHERE rows <= 0)" for table, key in SUMMED_ROLLUPS.items()),
    "INSERT INTO changed_span SELECT * FROM (SELECT MIN(ts) AS lo, MAX(ts) FROM changed_requests) WHERE lo NOT NULL",
    "DELETE FROM changed_requests",
    "DELETE FROM changed_sums",
    "UPDATE sessions_settled SET upto = 0"]


# The writer's connection keeps more pages than SQLite's 2 MiB: a transaction of exports spread over a month changes
# a few thousand (indexes and rollups), and the next one changes most of them again.
WRITER_CACHE_KIB = 16 * 1024
# It copies the -wal into the database file when it has had no work for WRITER_IDLE_S, and while busy once the -wal
# holds this many pages (SQLite's default: 1,000; 128 MiB at 4 KiB pages), so that a page changed by many commits
# is copied once. The -wal file keeps up to that size while the writer is busy (the next commits overwrite it in
# place; a file cut back after each copy had every commit allocate its blocks anew: 8 % of a backfill's rate) and is
# cut to nothing when it rests.
WAL_CHECKPOINT_PAGES = 32768
WAL_HEADER_BYTES, WAL_FRAME_HEADER_BYTES = 32, 24  # SQLite's -wal format: a header, then a header per page
WRITER_IDLE_S = 0.5  # and it frees its cache then, before the server trims its heap (TRIM_DELAY_S)


def tune_writer(conn: sqlite3.Connection) -> None:
    """The writer connection's cache and checkpoints (see WRITER_CACHE_KIB and WAL_CHECKPOINT_PAGES), and its
    commits without an fsync of the -wal: the writer's syncer thread makes it, before anything committed is
    acknowledged (see Writer._sync_loop); SQLite still syncs the -wal before copying it into the database file,
    and that file after (synchronous = NORMAL). Measured on exports spread over a month in BENCHMARKS.md."""
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    wal_bytes = WAL_HEADER_BYTES + WAL_CHECKPOINT_PAGES * (WAL_FRAME_HEADER_BYTES + page_size)
    conn.execute(f"PRAGMA journal_size_limit = {wal_bytes}")


def track_request_changes(conn: sqlite3.Connection) -> None:
    """Have this connection (the writer's) note each requests row it adds or removes, with its FIGURES (negated when
    removed), in changed_requests: a TEMP table and triggers, which only this connection has. The table stays in
    the page cache (a transaction's rows are few); PRAGMA temp_store = MEMORY made every import insert three times
    slower (BENCHMARKS.md)."""
    conn.execute(f"CREATE TEMP TABLE changed_requests (ts INTEGER NOT NULL, session INTEGER NOT NULL, "
                 f"model INTEGER NOT NULL, user INTEGER NOT NULL, {FIGURE_COLUMNS})")
    conn.execute("CREATE TEMP TABLE changed_span (lo INTEGER NOT NULL, hi INTEGER NOT NULL)")  # see changed_since
    conn.execute("CREATE TEMP TABLE sessions_settled (upto INTEGER NOT NULL)")  # see SETTLE_SESSIONS
    conn.execute("INSERT INTO sessions_settled VALUES (0)")
    conn.execute(f"CREATE TEMP TABLE changed_sums (bucket INTEGER NOT NULL, model INTEGER NOT NULL, "
                 f"user INTEGER NOT NULL, {FIGURE_COLUMNS})")  # see SETTLE_ROLLUPS
    conn.execute("CREATE TEMP TABLE row_by_row (noting INTEGER NOT NULL)")  # see insert_requests
    conn.execute("INSERT INTO row_by_row VALUES (1)")
    for change, row, sign in (("INSERT", "NEW.", ""), ("DELETE", "OLD.", "-")):
        figures = ", ".join(sign + expression.format(r=row) for expression in FIGURES.values())
        conn.execute(f"CREATE TEMP TRIGGER requests_{change.lower()}_noted AFTER {change} ON main.requests WHEN "
                     f"(SELECT noting FROM row_by_row) BEGIN INSERT INTO changed_requests VALUES ({row}ts, "
                     f"{row}session, {row}model, {row}user, {figures}); END")


NOTE_ADDED = (f"INSERT INTO changed_requests SELECT ts, session, model, user, "
              f"{', '.join(expression.format(r='') for expression in FIGURES.values())} FROM requests WHERE id > ?")


def insert_requests(conn: sqlite3.Connection, sql: str, rows: list | None = None) -> int:
    """Run an INSERT OR IGNORE into requests for every row, or once without rows (on the writer's connection: see
    track_request_changes); how many were added. They are noted in changed_requests in one statement after, not
    by the trigger one at a time (a third of the insert's time): a new row's id is above every id before it."""
    last = conn.execute("SELECT COALESCE(MAX(id), 0) FROM requests").fetchone()[0]
    conn.execute("UPDATE row_by_row SET noting = 0")
    added = (conn.execute(sql) if rows is None else conn.executemany(sql, rows)).rowcount
    conn.execute("UPDATE row_by_row SET noting = 1")
    conn.execute(NOTE_ADDED, (last,))
    return added


def settle_rollups(conn: sqlite3.Connection) -> None:
    """Add the requests rows noted since the last call (see track_request_changes) to SUMMED_ROLLUPS and
    session_usage, one upsert per key, and delete the keys left without rows; note their span of times in
    changed_span. In the writing transaction, before its COMMIT and before the writer reads a summed rollup. Without
    a row noted, nothing: a statement costs its thread the GIL twice, which the RPC threads of a busy server hold
    for up to the switch interval each time (see run_server)."""
    if conn.execute("SELECT 1 FROM changed_requests LIMIT 1").fetchone() is None:
        return
    for statement in SETTLE_ROLLUPS:
        conn.execute(statement)


def settle_sessions(conn: sqlite3.Connection) -> None:
    """Add the requests rows noted since session_usage was last settled to it alone (see SETTLE_SESSIONS): before
    the writer reads it. The summed rollups wait for the transaction's end, summed once over all its jobs."""
    for statement in SETTLE_SESSIONS:
        conn.execute(statement)


def changed_since(conn: sqlite3.Connection) -> tuple[int, int] | None:
    """The span of times [lo, hi] of the requests rows the transaction added or removed, once settled (None when
    it changed none); what a BucketCache must forget once it commits."""
    lo, hi = conn.execute("SELECT MIN(lo), MAX(hi) FROM changed_span").fetchone()
    conn.execute("DELETE FROM changed_span")
    return None if lo is None else (lo, hi)


class BucketCache:
    """The points of whole series buckets already read (see Reader.series), per query shape, until a commit adds or
    removes a requests row in a bucket's time: a chart asking again for a year of days reads only today. A bucket
    cut by the period asked (its first or last) is not kept: a period ending now would add one at every ask.
    Readers fill it; the writer makes it forget what each commit changed, once committed. A reader keeps what it read
    only if no such commit came after it started (it might have read the rows from before it)."""
    MOST = 4_000  # points kept (a bucket without any counts 1; about 1.4 KB each), the least recently used
    # buckets dropped past it: a year of days by 8 models (2,920) and the monitor's 4 weeks of hours (672) fit.
    LONGEST_BUCKET_MS = 8 * DAY_MS  # a local week, clocks changed in it or not: how far back forget looks

    def __init__(self):
        self._lock = threading.Lock()
        self._commits = 0  # commits that changed rows, so far
        self._kept: dict[tuple[int, int, tuple], tuple[SeriesPoint, ...]] = {}  # least recently used first
        self._starts: list[tuple[int, int, tuple]] = []  # the same (start, end, shape) keys in time order
        self._size = 0

    def commits(self) -> int:
        return self._commits

    def points(self, shape: tuple, start: int, end: int) -> tuple[SeriesPoint, ...] | None:
        """The points of the bucket [start, end) of this shape, None when not kept."""
        with self._lock:
            points = self._kept.pop((start, end, shape), None)
            if points is not None:
                self._kept[start, end, shape] = points  # the most recently used now
            return points

    def keep(self, commits: int, shape: tuple, buckets: dict[tuple[int, int], tuple[SeriesPoint, ...]]) -> None:
        """Keep these buckets' points ([start, end) -> points), read by a reader that started when commits() was
        `commits`."""
        with self._lock:
            if commits != self._commits:
                return
            for (start, end), points in buckets.items():
                if (start, end, shape) in self._kept:
                    self._drop((start, end, shape))
                self._kept[start, end, shape] = points
                bisect.insort(self._starts, (start, end, shape))
                self._size += max(1, len(points))
            while self._size > self.MOST:
                self._drop(next(iter(self._kept)))

    def forget(self, lo: int, hi: int) -> None:
        """A commit added or removed rows of times within [lo, hi]."""
        with self._lock:
            self._commits += 1
            first = bisect.bisect_left(self._starts, (lo - self.LONGEST_BUCKET_MS,))
            last = bisect.bisect_right(self._starts, (hi, math.inf))
            for key in [key for key in self._starts[first:last] if key[1] > lo]:
                self._drop(key)

    def _drop(self, key: tuple[int, int, tuple]) -> None:
        self._size -= max(1, len(self._kept.pop(key)))
        del self._starts[bisect.bisect_left(self._starts, key)]


# The counter series' figures of some sessions (?1: a JSON array of session ids), per (user, model, project id): a
# session's usage per model (session_usage) under its latest user and its project (0 for none).
SERIES_FIGURES = list(FIGURES)[1:]
STORED_SERIES = (  # summed per project name, then each name looked up once
    f"SELECT n.user, n.model, COALESCE(p.id, 0), {', '.join(f'n.{c}' for c in SERIES_FIGURES)} FROM (SELECT su.user, "
    f"su.model, s.project AS name, {', '.join(f'SUM(su.{c}) AS {c}' for c in SERIES_FIGURES)} FROM session_usage su "
    "JOIN sessions s ON s.id = su.session{where} GROUP BY 1, 2, 3) n LEFT JOIN projects p ON p.name = n.name")
SESSION_SERIES = STORED_SERIES.format(where=" WHERE su.session IN (SELECT value FROM json_each(?1))")
RETIRE = (f"INSERT INTO retired_usage (user, model, project, {', '.join(SERIES_FIGURES)}) VALUES "
          f"({', '.join('?' * (3 + len(SERIES_FIGURES)))}) ON CONFLICT (user, model, project) DO UPDATE SET "
          f"{', '.join(f'{c} = {c} + excluded.{c}' for c in SERIES_FIGURES)}")

NUMBER_SERIES = "INSERT INTO metric_series (user, model, project) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"


def series_sums(conn: sqlite3.Connection, sessions: Iterable[int]) -> dict[tuple[int, int, int], tuple[int, ...]]:
    return {tuple(row[:3]): tuple(row[3:])
            for row in conn.execute(SESSION_SERIES, (json.dumps(sorted(set(sessions))),))}


@contextlib.contextmanager
def counters_kept(conn: sqlite3.Connection, sessions: Iterable[int]) -> Iterator[None]:
    """Keep the Prometheus counters from going down across a change to these sessions' rows or names (the only
    sessions it may change): whatever a counter series' figures lost over the change (rows deleted, replaced by
    rows of lower figures, moved to another project or user) is added to its retired_usage, in the same
    transaction. What rows the change added to a series in the same go offsets what it took away."""
    sessions = set(sessions)
    if not sessions:
        yield
        return
    settle_sessions(conn)  # session_usage with the transaction's changes so far in it
    before = series_sums(conn, sessions)
    yield
    settle_sessions(conn)
    after = series_sums(conn, sessions)
    for key, figures in before.items():
        lost = [max(0, was - now) for was, now in zip(figures, after.get(key, (0,) * len(figures)))]
        if any(lost):
            conn.execute(RETIRE, (*key, *lost))
    # A series seen for the first time is numbered after all others (what the change made, not what it passed by).
    conn.executemany(NUMBER_SERIES, sorted(key for key in after if key not in before))


# What an api_request event replaces (see OriginRule), as conditions over an SQL list of its sessions' ids, or of its
# request_ids: the metric-derived usage of its session, and a transcript's copy of itself, in any session.
USAGE_EVENTS_REPLACE = f"{origin_in(replaced_by(ORIGIN_EVENT) - REQUEST_ORIGINS)} AND session IN ({{}})"
COPIES_EVENTS_REPLACE = f"{origin_in(replaced_by(ORIGIN_EVENT) & REQUEST_ORIGINS)} AND request_id IN ({{}})"
# Metric-derived usage counts for a session until a row that replaces it is stored.
METRIC_USAGE_REPLACED_BY = origin_in(origin for origin in ORIGIN_RULES if ORIGIN_METRICS in replaced_by(origin))


def insert_sql(table: str, columns: tuple) -> str:
    return f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


# A large export of api_request events spread over days (a backfill's: an import, machines catching up) is
# acknowledged once it waits in the log beside the database (see WaitingLog), then applied with the exports after it
# to requests, its indexes and the rollups in one transaction (through pending_requests): once APPLY_ROWS wait, once
# no export has come for APPLY_IDLE_S, and before any other job, a read's included (see Writer.catch_up). Spread
# over a month, a million such records wrote a random page of each index and rollup for every few of them; applied
# tens of thousands at a time, each page is written once for many (BENCHMARKS.md). Other exports, as Claude Code
# sends while it works or a queue of its exports catching up in time order, are stored at once: their records share
# pages already, and they would wait for nothing.
STAGE_MIN_REQUESTS = 128
STAGE_MIN_SPAN_MS = DAY_MS
APPLY_ROWS = 32_768
PENDING_MOST = 4 * APPLY_ROWS  # past it (applies failing or slow), exports are stored at once: their senders wait
APPLY_IDLE_S = 0.05
WAKE = object()  # queued by the stager for a resting writer: exports wait now
STAGE = insert_sql("pending_requests", REQUEST_COLUMNS).replace("OR IGNORE ", "")
# In the order of the session index and of session_usage (8 % faster than in time order at 1M records); a key sent
# twice is stored as first sent, as at once.
APPLY = (f"INSERT OR IGNORE INTO requests ({', '.join(REQUEST_COLUMNS)}) SELECT {', '.join(REQUEST_COLUMNS)} FROM "
         "pending_requests ORDER BY session, ts, rowid")
PENDING_ROWS = "SELECT COUNT(*) FROM pending_requests"  # a version 16 server's, left by a stop: applied first


def stageable(batch: Batch) -> bool:
    """Whether a batch may wait to be applied (see STAGE_MIN_REQUESTS): Claude Code's api_request
    events, at least that many over at least STAGE_MIN_SPAN_MS, each dated, in a batch without metric points or turn
    costs. Other agents' calls replace usage by agent and user (see _replace_session_less_metrics) and claim models
    (_own_models), a metric point counts only where its session has no requests, and an undated record's resend is
    found among the stored rows (UNDATED_SEQ): those are stored at once."""
    agent, origin, seq = (REQUEST_COLUMNS.index(c) for c in ("agent", "origin", "seq"))
    if len(batch.requests) < STAGE_MIN_REQUESTS or batch.metrics or batch.turn_costs:
        return False
    times = [row[0] for row in batch.requests]
    return max(times) - min(times) >= STAGE_MIN_SPAN_MS and all(
        row[agent] == CLAUDE_CODE and row[origin] == ORIGIN_EVENT and row[seq] > UNDATED_SEQ for row in batch.requests)


# The exports waiting to be applied (see STAGE_MIN_REQUESTS) are appended, as numbered frames, to two files beside
# the database, in turns: the writer rewrites neither, so the exports go on being acknowledged while it applies
# those before (a bulk apply of tens of thousands of rows takes it about half a second, which held every sender and
# left a core idle: BENCHMARKS.md). A file is emptied once every frame in it is applied and on disk, and the next
# frames go to the other once this one holds WAITING_FILE_BYTES.
WAITING_FILE_BYTES = 8 * 1024 ** 2
WAITING_MAGIC = b"ccmonwl1"
WAITING_HEADER = struct.Struct("<8sq")  # magic, the database's waiting_log.id
WAITING_FRAME = struct.Struct("<qII")  # sequence number, payload bytes, CRC-32 of both and the payload
WAITING_MARSHAL = 4  # the format every Python from 3.11 reads (3.14 writes 5 by default)


def fsync_folder(folder: Path) -> None:
    """Make the names of the files in a folder durable (where the system can open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclasses.dataclass(frozen=True)
class WaitingFrame:
    """Where one waiting batch is: its number, its file (0 or 1), offset and length, and how many requests it has."""
    seq: int
    slot: int
    offset: int
    length: int
    requests: int


def frame_crc(seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(WAITING_FRAME.pack(seq, len(payload), 0)))


def waiting_payload(batch: Batch) -> bytes:
    receipt = dataclasses.astuple(batch.receipt) if batch.receipt else None
    return marshal.dumps((batch.requests, batch.events, batch.projects, receipt), WAITING_MARSHAL)


def waiting_batch(payload: bytes) -> Batch:
    requests, events, projects, receipt = marshal.loads(payload)
    return Batch(requests=requests, events=events, projects=projects,
                 receipt=ReceiverCounts(*receipt) if receipt else None)


class WaitingLog:
    """The two files where a backfill's large exports wait (see WAITING_FILE_BYTES), each a header (WAITING_HEADER)
    and frames (WAITING_FRAME, then the batch: waiting_payload). The database notes the last frame it applied
    (waiting_log.applied), in the transaction that applies it; at a start, the frames after it are the ones waiting,
    and a frame cut short by a crash (never acknowledged) is cut off. The stager thread appends; the syncer tells
    which frames are applied and on disk (`durable`); the writer reads the frames it is given, which stay until
    then. An error makes the log `failed`: exports are then stored at once."""

    def __init__(self, path: Path, log_id: int, applied: int):
        self.paths = [path.with_name(f"{path.name}-waiting-{slot}") for slot in "ab"]
        self.failed = ""
        self.durable = applied  # the last frame applied in the database and on disk
        self._header = WAITING_HEADER.pack(WAITING_MAGIC, log_id)
        self._lock = threading.Lock()
        self._fds: list[int] = []
        self._ends: list[int] = []
        self._last_in = [0, 0]  # the last frame in each file
        self.recovered: list[WaitingFrame] = []  # the frames waiting at the start
        for slot, file in enumerate(self.paths):
            try:
                self._fds.append(self._open(slot))
            except OSError as exc:
                self.close()
                raise StorageError(f"cannot use {file} ({exc.strerror}): the server keeps the exports waiting to be "
                                   "applied there, beside the database; move it aside") from None
            self._ends.append(self._recover(slot, applied))
        self._slot = 0 if self._last_in[0] >= self._last_in[1] else 1
        self._last = max(applied, *self._last_in)
        self.recovered.sort(key=lambda frame: frame.seq)
        self._make_room()
        fsync_folder(path.parent)  # the files exist after a power cut

    def _open(self, slot: int) -> int:
        return os.open(self.paths[slot], os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)

    def _recover(self, slot: int, applied: int) -> int:
        """Read a file's frames, note those after `applied` as waiting; its end, what follows the last whole frame
        cut off. A file of another database (this one was replaced), or one this ccmon cannot read, is put aside,
        with a warning, if it has frames; either way it starts again."""
        fd, size = self._fds[slot], os.fstat(self._fds[slot]).st_size
        if os.pread(fd, WAITING_HEADER.size, 0) != self._header:
            return self._put_aside(slot, "was not written for this database") if size > WAITING_HEADER.size \
                else self._reset(slot)
        offset, frames = WAITING_HEADER.size, []
        while offset + WAITING_FRAME.size <= size:
            seq, length, crc = WAITING_FRAME.unpack(os.pread(fd, WAITING_FRAME.size, offset))
            payload = os.pread(fd, length, offset + WAITING_FRAME.size)
            if len(payload) != length or frame_crc(seq, payload) != crc:
                break
            if seq > applied:
                try:
                    requests = len(waiting_batch(payload).requests)
                except (ValueError, EOFError, TypeError) as exc:  # written by another version of ccmon
                    return self._put_aside(slot, f"cannot be read ({exc})")
                frames.append(WaitingFrame(seq, slot, offset + WAITING_FRAME.size, length, requests))
            self._last_in[slot] = max(self._last_in[slot], seq)
            offset += WAITING_FRAME.size + length
        self.recovered += frames
        if offset < size:
            log.warning("%s ends with %d bytes that are not a whole frame (a write a crash cut short, never "
                        "acknowledged): cut off", self.paths[slot], size - offset)
            os.ftruncate(fd, offset)
            os.fsync(fd)
        return offset

    def _put_aside(self, slot: int, why: str) -> int:
        """Keep a file the database cannot take beside it, under another name, and start that one again."""
        aside = self.paths[slot].with_name(f"{self.paths[slot].name}.{time.strftime('%Y%m%d%H%M%S')}")
        os.rename(self.paths[slot], aside)
        log.warning("%s %s: it is kept as %s, and not applied", self.paths[slot], why, aside)
        os.close(self._fds[slot])
        self._fds[slot] = self._open(slot)
        self._last_in[slot] = 0
        return self._reset(slot)

    def _reset(self, slot: int) -> int:
        """Empty a file (its frames all applied and on disk, or none of this database's): its header alone. A file
        that cannot be written (a full disk) makes the log `failed`: exports are stored at once until a restart."""
        fd = self._fds[slot]
        try:
            os.ftruncate(fd, 0)
            if os.pwrite(fd, self._header, 0) != len(self._header):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        except OSError as exc:
            if not self.failed:
                self.failed = f"cannot write {self.paths[slot]} ({exc.strerror})"
                log.warning("%s; exports are stored at once until the server restarts", self.failed)
        self._last_in[slot] = 0
        return WAITING_HEADER.size

    def append(self, batches: list[Batch]) -> list[WaitingFrame]:
        """Write the batches as frames, on disk when this returns. OSError: none of them is acknowledged, and the
        log is not used again (`failed`): after a failed write or fsync nothing says what reached the disk."""
        with self._lock:
            try:
                self._make_room()
                if self.failed:
                    raise OSError(errno.EIO, self.failed)
                slot, offset, chunks, frames = self._slot, self._ends[self._slot], [], []
                for batch in batches:
                    payload = waiting_payload(batch)
                    self._last += 1
                    chunks += [WAITING_FRAME.pack(self._last, len(payload), frame_crc(self._last, payload)), payload]
                    frames.append(WaitingFrame(self._last, slot, offset + WAITING_FRAME.size, len(payload),
                                               len(batch.requests)))
                    offset += WAITING_FRAME.size + len(payload)
                data = b"".join(chunks)
                if os.pwrite(self._fds[slot], data, self._ends[slot]) != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                os.fsync(self._fds[slot])
            except OSError as exc:
                self.failed = self.failed or f"cannot write {self.paths[self._slot]} ({exc.strerror})"
                with contextlib.suppress(OSError):  # what may have reached it was not acknowledged: never applied
                    os.ftruncate(self._fds[self._slot], self._ends[self._slot])
                    os.fsync(self._fds[self._slot])
                raise
            self._ends[slot], self._last_in[slot] = offset, self._last
            return frames

    def _make_room(self) -> None:
        """Empty what is applied and on disk; past WAITING_FILE_BYTES, go on in the other file once it is empty."""
        for slot in (0, 1):
            if self._last_in[slot] and self._last_in[slot] <= self.durable:
                self._ends[slot] = self._reset(slot)
        if self._ends[self._slot] >= WAITING_FILE_BYTES and not self._last_in[1 - self._slot]:
            self._slot = 1 - self._slot

    def read(self, frame: WaitingFrame) -> Batch:
        """A waiting frame's batch; sqlite3.OperationalError where the file cannot be read (the apply fails, and is
        tried again)."""
        try:
            payload = os.pread(self._fds[frame.slot], frame.length, frame.offset)
        except OSError as exc:
            raise sqlite3.OperationalError(f"cannot read {self.paths[frame.slot]} ({exc.strerror})") from None
        if len(payload) != frame.length:
            raise sqlite3.OperationalError(f"{self.paths[frame.slot]} is shorter than what was written to it")
        return waiting_batch(payload)

    def close(self) -> None:
        """Close the files, and remove them once every frame is applied and on disk: a stopped server leaves its
        database in one file (a stop that could not apply what waits leaves them for the next start)."""
        with self._lock:
            for fd in self._fds:
                os.close(fd)
            if all(last <= self.durable for last in self._last_in):
                for file in self.paths:
                    with contextlib.suppress(OSError):
                        file.unlink()


def taken_until_end(items: queue.Queue) -> list:
    """The next item (waiting for it) and those queued after it, up to None (the end) if it comes."""
    taken = [items.get()]
    while taken[-1] is not None:
        try:
            taken.append(items.get_nowait())
        except queue.Empty:
            break
    return taken


class Writer:
    """The one writer of the database. Its thread commits queued jobs in groups, and a job's result is delivered
    only after its COMMIT and a check that the file committed to is still the database at its path."""

    def __init__(self, path: Path, queue_size: int = 256, prices: dict[str, Price] | None = None):
        self.path, self.prices = path, prices  # prices: [pricing], for the other agents' metrics
        self._new_folders: list[Path] = []
        try:
            self._new_folders = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._file = DatabaseFile(path)
        except OSError as exc:
            self._remove_new_folders()
            raise StorageError(f"cannot use the database folder {path.parent}: {exc.strerror}") from None
        try:
            # State of the writer thread alone: the write connection, interned ids, the failure streak.
            self._write_conn = open_database(path)
            tune_writer(self._write_conn)
            track_request_changes(self._write_conn)
            real = Path(os.path.realpath(path))  # SQLite keeps its -wal beside the file, not beside a symlink
            self._file.watch(real.with_name(real.name + "-wal"))
            self._wal = os.open(real.with_name(real.name + "-wal"), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            os.fsync(self._wal)  # what the last run committed, waiting_log.applied included, is on disk before the log
            # is emptied of the frames it applied: it may have stopped before its syncer made it durable
            self._log = WaitingLog(real, *self._write_conn.execute("SELECT id, applied FROM waiting_log").fetchone())
        except (StorageError, OSError) as exc:
            self._file.close()
            self.remove_if_new()
            raise exc if isinstance(exc, StorageError) else StorageError(f"cannot use {path}: {exc}") from None
        # The exports waiting in the log (the stager adds them, the writer takes them once applied), and how many
        # requests wait: those and any a version 16 server left in pending_requests, applied first.
        self._waiting, self._waiting_lock = self._log.recovered, threading.Lock()
        self._pending = self._write_conn.execute(PENDING_ROWS).fetchone()[0] + sum(f.requests for f in self._waiting)
        self._last_staged = 0.0  # when the stager last appended (monotonic)
        self._ids: dict[tuple[str, Any], int] = {}  # (table, value) -> id of interned values
        self._failing = False  # log a failure streak once, and its end once
        self.buckets = BucketCache()  # what the server's reader read, forgotten as commits change it
        self._imported = False  # whether requests from transcripts are stored (telemetry then replaces its copies)
        self._copy_windows: set[CopyWindow] = set()  # of the imports under way (import_requests' threads add them)
        self._lost = ""        # why the file at the path is no longer the one written: nothing more is acknowledged
        self._unsynced = ""    # why the -wal could not be made durable: nothing more is acknowledged either
        self._jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self._closed = False
        self._drain_until = math.inf  # close() bounds how long queued jobs may still be written
        self._committed: queue.Queue = queue.Queue()  # groups committed, for the syncer to answer once on disk
        self._syncer = threading.Thread(target=self._sync_loop, name="ccmon-syncer", daemon=True)
        self._syncer.start()
        self._writer = threading.Thread(target=self._write_loop, name="ccmon-writer", daemon=True)
        self._writer.start()
        self._staging: queue.Queue = queue.Queue()  # (batch, future) to append to the log; None: the end
        self._closing = threading.Lock()
        self._stager = threading.Thread(target=self._stage_loop, name="ccmon-stager", daemon=True)
        self._stager.start()

    def remove_if_new(self) -> None:
        """After a start that failed: a database this start created leaves nothing behind, nor do the folders it
        made for it (while empty: a local server's log may be there)."""
        if self._file.created:
            real = Path(os.path.realpath(self.path))
            for suffix in ("", "-wal", "-shm", "-journal", "-waiting-a", "-waiting-b"):
                with contextlib.suppress(OSError):  # (a folder of the user's in the way stays)
                    real.with_name(real.name + suffix).unlink(missing_ok=True)
        self._remove_new_folders()

    def _remove_new_folders(self) -> None:
        for folder in self._new_folders:  # the deepest first; one holding anything stays
            with contextlib.suppress(OSError):
                folder.rmdir()

    def moved(self) -> str:
        """'' while the database file is at its path, else what happened to it (see DatabaseFile.moved)."""
        return self._file.moved()

    def _checkpoint(self) -> None:
        """Copy the -wal into the database file: what was committed stays in the file the server opened, wherever
        it now is (SQLite finds a -wal only beside the file's path, and the path may no longer name it)."""
        try:
            busy, _, _ = self._write_conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy:
                log.error("the database %s could not be checkpointed: a read was still open", self.path)
        except sqlite3.Error as exc:
            log.error("the database %s could not be checkpointed: %s", self.path, exc)

    def submit(self, job: Callable[[sqlite3.Connection], Any], timeout: float = 2.0) -> futures.Future:
        """Queue a job for the writer; its Future resolves after the job's transaction commits. A job may be run
        again after its transaction was rolled back (another job of its group failed: see _run_group), so it has
        no effect outside the database but on caches. The exports waiting are applied before it runs (see
        STAGE_MIN_REQUESTS)."""
        if self._closed:
            raise StorageUnavailable("the server is shutting down")
        future: futures.Future = futures.Future()
        try:
            self._jobs.put((job, future), timeout=timeout)
        except queue.Full:
            raise StorageUnavailable("the ingestion queue is full", retry_after_s=2) from None
        return future

    def write(self, batch: Batch, timeout: float = 8.0) -> tuple[int, int]:
        """Store a batch durably: (how many rows were new, duplicates being ignored; how many requests wait to be
        applied, which are not known to be new yet: see STAGE_MIN_REQUESTS)."""
        if stageable(batch) and self._pending < PENDING_MOST and not (self._failing or self._log.failed):
            future = futures.Future()
            with self._closing:  # nothing is queued after close() ended the stager
                if self._closed:
                    raise StorageUnavailable("the server is shutting down")
                self._staging.put((batch, future))
        else:
            future = self.submit(lambda conn: (self._insert(conn, batch), 0), timeout=0.5)
        try:
            return future.result(timeout=timeout)
        except futures.TimeoutError:
            raise StorageUnavailable("the database did not commit in time") from None

    @property
    def waiting(self) -> int:
        """How many requests wait to be applied."""
        return self._pending

    def catch_up(self, timeout: float = 60.0) -> None:
        """Before a read: the exports acknowledged but waiting applied (a job of its own, which the writer applies
        them before). The stager counts them before it acknowledges them, so a read after an acknowledgement counts
        what it acknowledged."""
        if self._pending:
            try:
                self._job(lambda conn: None, timeout)
            except StorageUnavailable as exc:
                raise sqlite3.OperationalError(f"{self._pending:,} requests received are not counted yet ({exc})"
                                               ) from None

    def record_reading(self, reading: LimitReading, timeout: float = 2.0) -> None:
        """Store a status line reading durably; its project names the session's when nothing else has."""
        future = self.submit(lambda conn: self._insert_reading(conn, reading), timeout=timeout)
        try:
            future.result(timeout=timeout)
        except futures.TimeoutError:
            raise StorageUnavailable("the database did not commit in time") from None

    def record_agent_readings(self, readings: list[LimitReading], timeout: float = 60.0) -> int:
        """Store other agents' limit readings read from their histories durably; one stored already (its session,
        agent and time) is skipped. How many were new."""
        return self._job(lambda conn: sum(self._insert_reading(conn, reading) for reading in readings), timeout)

    def _insert_reading(self, conn: sqlite3.Connection, reading: LimitReading) -> bool:
        session = self._intern(conn, "sessions", "session_id", reading.session_id)
        agent = self._intern(conn, "agents", "name", reading.agent)
        if reading.agent != CLAUDE_CODE and conn.execute(
                "SELECT 1 FROM limit_readings WHERE session = ? AND ts = ? AND agent = ?",
                (session, reading.read_ms, agent)).fetchone():
            return False  # read again from the same history
        with counters_kept(conn, [session] if reading.project else []):  # a session named: its usage moves project
            self._store_reading(conn, session, reading, agent)
        return True

    @staticmethod
    def _store_reading(conn: sqlite3.Connection, session: int, reading: LimitReading, agent: int) -> None:
        windows = [(w.percent, w.resets_ms) if w else (None, None) for w in (reading.five_hour, reading.seven_day)]
        spend = json.dumps(dataclasses.asdict(reading.spend_limit)) if reading.spend_limit else None
        conn.execute(f"INSERT INTO limit_readings ({', '.join(READING_COLUMNS)}) VALUES "
                     f"({', '.join('?' * len(READING_COLUMNS))})",
                     (reading.read_ms, session, reading.project or None, reading.model or None,
                      reading.context_percent, *windows[0], *windows[1], spend, reading.version or None, agent))
        if reading.project:
            conn.execute("UPDATE sessions SET project = ? WHERE id = ? AND project IS NULL", (reading.project, session))

    def _write_loop(self) -> None:
        while True:
            try:
                first = self._jobs.get(timeout=APPLY_IDLE_S if self._pending else WRITER_IDLE_S)
            except queue.Empty:
                first = WAKE if self._pending and not self._refused() else None
                if first is None:
                    self._rest()  # the next job applies what waits (or fails as the apply did)
                    first = self._jobs.get()
            if first is WAKE:
                if self._pending and not self._refused() and (
                        self._pending >= APPLY_ROWS or time.monotonic() - self._last_staged >= APPLY_IDLE_S):
                    self._apply()
                continue
            if first is None or time.monotonic() > self._drain_until:
                if first is None and self._pending:
                    self._apply()  # what was acknowledged is stored either way: the next start would apply it
                self._fail_queued(first)
                return
            group = [first]
            while len(group) < 64:
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._jobs.put(None)  # finish this group, then stop
                    break
                if item is not WAKE:
                    group.append(item)
            self._run_group(group)
            first = item = group = None  # else the last jobs, and the rows they hold, live until the next write

    def _apply(self) -> None:
        """Apply the exports waiting, in a transaction of their own (a job that does nothing else)."""
        self._run_group([(lambda conn: None, futures.Future())])

    def _stage_loop(self) -> None:
        """Append the exports that may wait (see stageable) to the log, the exports queued meanwhile together, and
        acknowledge them once on disk: counted as waiting first, so the read after an acknowledgement waits for them
        (see catch_up). Ends at None, which close() queues last (see write)."""
        while True:
            group = taken_until_end(self._staging)
            self._stage_group([item for item in group if item is not None])
            if group[-1] is None:
                return
            group = None  # else the last exports live until the next

    def _stage_group(self, group: list[tuple[Batch, futures.Future]]) -> None:
        refusal = self._refusal()
        if not refusal:
            try:
                frames = self._log.append([batch for batch, _ in group])
            except OSError as exc:
                log.error("%s; exports are stored at once from now on", self._log.failed)
                refusal = StorageUnavailable(f"database write failed: {exc.strerror}")
            except Exception as exc:  # a bug of ccmon's costs the exports it met, never the stager
                log.exception("appending exports to the waiting log failed")
                refusal = StorageUnavailable(f"the write failed: {exc}")
        if refusal:
            for _, future in group:
                future.set_exception(refusal)
            return
        with self._waiting_lock:
            self._waiting += frames
            before, self._pending = self._pending, self._pending + sum(frame.requests for frame in frames)
            self._last_staged = time.monotonic()
        if not before or before < APPLY_ROWS <= self._pending:  # the writer may be resting, or due to apply them
            with contextlib.suppress(queue.Full):
                self._jobs.put_nowait(WAKE)
        for (_, future), frame in zip(group, frames):
            future.set_result((0, frame.requests))

    def _rest(self) -> None:
        """Without work: the -wal copied into the database file and cut to nothing (see WAL_CHECKPOINT_PAGES), and
        the cache freed. A read still using the -wal is not waited for: what it holds is copied, the file stays
        until the next rest (SQLite's checkpoint, TRUNCATE mode, without a busy handler)."""
        conn = self._write_conn
        with contextlib.suppress(sqlite3.Error):  # tried again at the next rest, or by SQLite once the -wal is long
            conn.execute("PRAGMA shrink_memory")
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                conn.execute(f"PRAGMA busy_timeout = {WRITER_BUSY_MS}")

    def _fail_queued(self, first) -> None:
        """Jobs that raced with close(), or outlived its deadline, get an answer instead of waiting forever."""
        item = first
        while True:
            if item is not None and item is not WAKE:
                item[1].set_exception(StorageUnavailable("the server is shutting down"))
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return

    def _refused(self) -> bool:
        """Whether writes fail or nothing is acknowledged: what waits is applied by the next job, if it can be."""
        return bool(self._failing or self._lost or self._unsynced)

    def _refusal(self) -> StorageUnavailable | None:
        """Why nothing more is acknowledged (the file is gone, or the -wal could not be made durable), if so."""
        if self._lost:
            return StorageUnavailable(f"the database file is gone ({self._lost}); stop the server and put the file "
                                      f"back at {self.path}", 30)
        return StorageUnavailable(self._unsynced, 30) if self._unsynced else None

    def _run_group(self, group: list) -> None:
        refusal = self._refusal()
        if refusal:
            for _, future in group:
                future.set_exception(refusal)
            return
        conn = self._write_conn
        try:
            outcome = self._commit(conn, group, savepoints=False)
            if outcome is None:  # a job failed, and the transaction with it: the group again, a savepoint per job
                outcome = self._commit(conn, group, savepoints=True)
            results, changed, applied = outcome
        except sqlite3.Error as exc:
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the transaction is gone either way
            self._ids.clear()  # ids inserted by the rolled-back transaction are gone
            if not self._failing:
                log.error("cannot write to the database %s (%s); %s", self.path, exc,
                          f"it is damaged: stop the server, {recovery_advice(self.path)}" if is_damage(exc) else
                          "exporters are told to retry until it works again")
            self._failing = True
            failure = StorageUnavailable(f"database write failed: {exc}")
            for _, future in group:
                future.set_exception(failure)
            return
        if changed:
            self.buckets.forget(*changed)
        self._lost = self._file.replaced()
        if self._lost:
            log.critical("THE DATABASE FILE IS GONE: %s. The server no longer acknowledges any data, so exporters "
                         "keep it until it can be stored. Everything acknowledged is in the file the server opened: "
                         "stop the server and put that file back at %s (started without it, the server begins a new "
                         "database there).", self._lost, self.path)
            self._checkpoint()
            self._run_group(group)  # answers every job of the group as not stored
            return
        if self._failing:
            log.warning("the database %s is writable again", self.path)
            self._failing = False
        self._committed.put((group, results, applied))

    def _sync_loop(self) -> None:
        """Answer the committed groups once the -wal holding them is on disk: an fsync for all the groups committed
        while the last one ran, here, while the writer goes on with the next (SQLite's own fsync at each commit,
        synchronous = FULL, would make it wait: see tune_writer). Ends at None, after the groups before it."""
        while True:
            committed = taken_until_end(self._committed)
            if not self._unsynced:
                try:
                    os.fsync(self._wal)
                except OSError as exc:
                    self._stop_acknowledging(exc)
                else:  # the log's frames applied are in the database on disk: their files may be emptied
                    self._log.durable = max([self._log.durable, *(item[2][-1].seq for item in committed
                                                                  if item is not None and item[2])])
            failure = StorageUnavailable(self._unsynced, 30) if self._unsynced else None
            if not self._answer(committed, failure):
                return
            committed = None  # else the last jobs, and the rows they hold, live until the next commit

    def _stop_acknowledging(self, exc: OSError) -> None:
        """After an fsync of the -wal failed: what was committed may never reach the disk, and a later fsync that
        succeeds says nothing of it (the kernel may have dropped the pages it failed to write), while SQLite's
        recovery stops at the first frame missing from the -wal, losing whatever was committed after it. So
        nothing more is acknowledged, or written: exporters keep their data until a restart, which recovers what
        the disk holds."""
        self._unsynced = (f"the database could not be written to disk ({exc.strerror}); check the disk, then "
                          "restart the server")
        log.critical("THE DATABASE %s COULD NOT BE WRITTEN TO DISK: %s. The server no longer acknowledges any data, "
                     "so exporters keep it until it can be stored. Check the disk, then restart the server: it "
                     "recovers what the disk holds.", self.path, exc)

    @staticmethod
    def _answer(committed: list, failure: Exception | None) -> bool:
        """Each job's result, or its error, or `failure` for all; False once None (the end) is among them."""
        for item in committed:
            if item is None:
                return False
            for (_, future), (result, exc) in zip(*item[:2]):
                if exc is None and failure is None:
                    future.set_result(result)
                else:
                    future.set_exception(exc or failure)
        return True

    def _commit(self, conn: sqlite3.Connection, group: list, savepoints: bool
                ) -> tuple[list, tuple | None, list[WaitingFrame]] | None:
        """Apply the exports waiting, run the group's jobs in the same transaction and commit it: each job's (result,
        None) or (None, the error it failed with), the span of times it changed (see changed_since), and the frames
        applied. Without savepoints, the first job to fail rolls the whole transaction back (None). A savepoint per
        job costs a copy of every page the job changes, written to a journal of its own: on exports spread over a
        month, as many bytes as the -wal gets. With savepoints, the waiting exports are applied one per savepoint
        too, and one that fails is dropped, saying so (it would sink every transaction); the apply failing otherwise
        fails the group, and what waits waits on."""
        results = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            applied = self._apply_waiting(conn, savepoints)
        except Exception as exc:
            if isinstance(exc, sqlite3.OperationalError) or is_damage(exc) or savepoints:
                raise sqlite3.OperationalError(f"the exports waiting could not be applied ({exc})") from exc
            self._ids.clear()
            conn.execute("ROLLBACK")
            return None
        for job, _ in group:
            if savepoints:
                conn.execute("SAVEPOINT job")
            try:
                results.append((job(conn), None))
            except Exception as exc:
                if isinstance(exc, sqlite3.OperationalError) or is_damage(exc):
                    raise  # locked, full, read-only, damaged: the whole group fails, its senders retry
                self._ids.clear()  # ids interned by what is rolled back are gone
                if not savepoints:
                    conn.execute("ROLLBACK")
                    return None
                log.error("a write failed and was rolled back: %r", exc)  # a bad job must not sink the group
                conn.execute("ROLLBACK TO job")
                results.append((None, StorageUnavailable(f"the write failed: {exc}")))
            if savepoints:
                conn.execute("RELEASE job")
        settle_rollups(conn)
        changed = changed_since(conn)
        conn.execute("COMMIT")
        if self._pending:  # the frames applied leave the list; what waits is what is left in it
            with self._waiting_lock:
                del self._waiting[:len(applied)]
                self._pending = sum(frame.requests for frame in self._waiting)
        return results, changed, applied

    def _intern(self, conn: sqlite3.Connection, table: str, column: str, value: Any) -> int | None:
        if value is None:
            return None
        key = (table, value)
        found = self._ids.get(key)
        if found is None:
            if len(self._ids) > 200_000:
                self._ids.clear()  # bounded memory; ids are looked up again as needed
            conn.execute(f"INSERT OR IGNORE INTO {table} ({column}) VALUES (?)", (value,))
            found = self._ids[key] = conn.execute(f"SELECT id FROM {table} WHERE {column} = ?", (value,)).fetchone()[0]
        return found

    def _resolve(self, conn: sqlite3.Connection, table: str, columns: tuple, rows: list[tuple]) -> list[tuple]:
        """Rows with their interned text replaced by ids, a column at a time; a batch has few distinct values."""
        values = list(zip(*rows))
        for i, name in enumerate(columns if rows else ()):
            if name in INTERNED[table]:
                target, column = INTERNED[table][name]
                ids = {value: self._intern(conn, target, column, value) for value in set(values[i])}
                values[i] = map(ids.__getitem__, values[i])
        return list(zip(*values))

    def _insert(self, conn: sqlite3.Connection, batch: Batch) -> int:
        requests = self._not_resent(conn, "requests", REQUEST_COLUMNS,
                                    self._resolve(conn, "requests", REQUEST_COLUMNS, batch.requests))
        model, agent = REQUEST_COLUMNS.index("model"), REQUEST_COLUMNS.index("agent")
        self._own_models(conn, {(row[model], row[agent]) for row in requests})
        metrics = self._resolve(conn, "metric_points", METRIC_COLUMNS, batch.metrics)
        with counters_kept(conn, self._touched(conn, requests, metrics, batch)):
            return self._insert_resolved(conn, batch, requests, metrics)

    def _stage_or_drop(self, conn: sqlite3.Connection, frame: WaitingFrame) -> None:
        conn.execute("SAVEPOINT frame")
        try:
            self._stage(conn, self._log.read(frame))
        except Exception as exc:
            if isinstance(exc, sqlite3.OperationalError) or is_damage(exc):
                raise
            conn.execute("ROLLBACK TO frame")
            self._ids.clear()  # ids interned by what is rolled back are gone
            log.error("an export waiting to be applied could not be (%r): its %d requests are dropped", exc,
                      frame.requests)
        conn.execute("RELEASE frame")

    def _stage(self, conn: sqlite3.Connection, batch: Batch) -> None:
        """Append a waiting batch's requests to pending_requests, and store the rest of it (events, projects, its
        counts) as any batch's."""
        conn.executemany(STAGE, self._resolve(conn, "requests", REQUEST_COLUMNS, batch.requests))
        rest = dataclasses.replace(batch, requests=[])
        if rest.events or rest.projects:  # after the rows: a project names a session they made
            self._insert(conn, rest)
        elif rest.receipt:  # an export's last batch: its counts alone (the usual case)
            self._count_receipt(conn, rest.receipt)

    def _apply_waiting(self, conn: sqlite3.Connection, savepoints: bool = False) -> list[WaitingFrame]:
        """Store the exports waiting in the log (and requests a version 16 server left in pending_requests) as
        _insert stores a batch's, their requests all in one go through pending_requests (see APPLY), and note the
        last frame applied: Claude Code's api_request events (see stageable), which replace the metric-derived
        usage of their sessions and the transcripts' copies of themselves (joined by request_id). The frames
        applied; with `savepoints`, one that fails is dropped (see _commit)."""
        if not self._pending:
            return []
        with self._waiting_lock:
            frames = list(self._waiting)
        for frame in frames:  # a frame at a time: only one export's rows are ever in memory
            if savepoints:
                self._stage_or_drop(conn, frame)
            else:
                self._stage(conn, self._log.read(frame))
        if frames:
            conn.execute("UPDATE waiting_log SET applied = ?", (frames[-1].seq,))
        if not conn.execute("SELECT 1 FROM pending_requests LIMIT 1").fetchone():
            return frames
        imported = self._has_imported(conn)
        copies = COPIES_EVENTS_REPLACE.format("SELECT request_id FROM pending_requests")
        touched = {session for session, in conn.execute("SELECT DISTINCT session FROM pending_requests")}
        if imported:
            touched.update(session for session, in conn.execute(f"SELECT session FROM requests WHERE {copies}"))
        with counters_kept(conn, touched):
            conn.execute(f"DELETE FROM requests WHERE "
                         f"{USAGE_EVENTS_REPLACE.format('SELECT session FROM pending_requests')}")
            if imported:
                conn.execute(f"DELETE FROM requests WHERE {copies}")
            insert_requests(conn, APPLY)
            if self._copy_windows:  # imports under way have read the rows stored before these
                for request_id, ts in conn.execute("SELECT request_id, ts FROM pending_requests WHERE request_id "
                                                   "IS NOT NULL").fetchall():
                    for window in tuple(self._copy_windows):
                        window.add(request_id, ts)
            conn.execute("DELETE FROM pending_requests")
        return frames

    def _touched(self, conn: sqlite3.Connection, requests: list, metrics: list, batch: Batch) -> set[int]:
        """The sessions whose usage or project a batch may change: its own, those it names a project or prices a
        turn of, the metrics sessions of the other agents it holds usage of (see _metrics_sessions; one a point
        naming no session will count in is made here), and those of the transcripts' copies of its requests."""
        touched = {row[1] for row in requests} | {row[METRIC_COLUMNS.index("session")] for row in metrics}
        named = [*batch.projects, *(session_id for session_id, _, _ in batch.turn_costs)]
        if named:
            touched.update(id_ for id_, in conn.execute("SELECT id FROM sessions WHERE session_id IN (SELECT value "
                                                        "FROM json_each(?))", (json.dumps(named),)))
        agents = {row[REQUEST_COLUMNS.index("agent")] for row in batch.requests}  # resent ones too: see
        # _replace_session_less_metrics
        empty = conn.execute("SELECT id FROM sessions WHERE session_id = ''").fetchone()  # (points naming none)
        name, kind, session, user = (METRIC_COLUMNS.index(c) for c in ("name", "type", "session", "user"))
        for row in metrics:
            agent = METRIC_USAGE_FIELDS.get((row[name], row[kind]), ("", {}))[0]
            agents.add(agent)
            if empty and row[session] == empty[0] and agent not in ("", CLAUDE_CODE):
                touched.add(self._metrics_session_of(conn, agent, row[user]))
        touched |= self._metrics_sessions(conn, agents)
        request_ids = [row[REQUEST_COLUMNS.index("request_id")] for row in requests]
        if requests and self._has_imported(conn):
            touched.update(id_ for id_, in conn.execute(
                f"SELECT session FROM requests WHERE {COPIES_EVENTS_REPLACE.format('SELECT value FROM json_each(?)')}",
                (json.dumps([rid for rid in request_ids if rid is not None]),)))
        return touched

    def _metrics_session_of(self, conn: sqlite3.Connection, agent: str, user: int) -> int:
        """The id of the session an agent's usage from metrics naming no session counts in, for a user id."""
        name = conn.execute("SELECT name FROM users WHERE id = ?", (user,)).fetchone()[0]
        return self._intern(conn, "sessions", "session_id", metrics_session(agent, name))

    @staticmethod
    def _metrics_sessions(conn: sqlite3.Connection, agents: Iterable[str]) -> set[int]:
        """Every user's metrics session of these agents (other than Claude Code): their calls replace what it
        counted near them (see _replace_session_less_metrics)."""
        found: set[int] = set()
        for agent in set(agents) - {"", CLAUDE_CODE}:
            prefix = metrics_session(agent, "")  # "codex metrics", and "codex metrics of USER" after it
            found.update(id_ for id_, in conn.execute("SELECT id FROM sessions WHERE session_id >= ? AND "
                                                      "session_id < ?", (prefix, prefix + "\U0010ffff")))
        return found

    def _insert_resolved(self, conn: sqlite3.Connection, batch: Batch, requests: list, metrics: list) -> int:
        new = 0
        if requests:
            self._replace_session_less_metrics(conn, batch.requests)
            listed = "SELECT value FROM json_each(?)"
            conn.execute(f"DELETE FROM requests WHERE {USAGE_EVENTS_REPLACE.format(listed)}",
                         (json.dumps(sorted({row[1] for row in requests})),))
            if self._has_imported(conn):  # and over a transcript's copy of the same request (Claude Code's cost)
                agent = REQUEST_COLUMNS.index("agent")
                for pair in {(row[1], row[agent]) for row in batch.requests if row[agent] in JOINED_BY_SESSION}:
                    conn.execute(SESSION_HISTORY_REPLACED, pair)
                request_id = REQUEST_COLUMNS.index("request_id")
                conn.execute(f"DELETE FROM requests WHERE {COPIES_EVENTS_REPLACE.format(listed)}",
                             (json.dumps([row[request_id] for row in requests if row[request_id] is not None]),))
            new += insert_requests(conn, insert_sql("requests", REQUEST_COLUMNS), requests)
            request_id = REQUEST_COLUMNS.index("request_id")
            for window in tuple(self._copy_windows):  # imports under way have read the rows stored before these
                for row in requests:
                    window.add(row[request_id], row[0])
        if batch.events:
            events = self._resolve(conn, "events", EVENT_COLUMNS, batch.events)
            new += conn.executemany(insert_sql("events", EVENT_COLUMNS),
                                    self._not_resent(conn, "events", EVENT_COLUMNS, events)).rowcount
        if metrics:
            for row in self._not_resent(conn, "metric_points", METRIC_COLUMNS, metrics):
                if conn.execute(insert_sql("metric_points", METRIC_COLUMNS), row).rowcount:  # new, not a resend
                    new += 1
                    self._usage_from_metric(conn, dict(zip(METRIC_COLUMNS, row)))
        for session_id, turn_id, cost in batch.turn_costs:
            self._price_turn(conn, session_id, turn_id, cost)
        for session, project in batch.projects.items():  # a project the user named wins over a status line's folder
            conn.execute("UPDATE sessions SET project = ? WHERE session_id = ? AND project IS NOT ?",
                         (project, session, project))
        if batch.receipt:
            self._count_receipt(conn, batch.receipt)
        return new

    @staticmethod
    def _count_receipt(conn: sqlite3.Connection, receipt: ReceiverCounts) -> None:
        conn.execute("INSERT INTO receiver_counts (protocol, signal, last_ms, accepted, rejected) VALUES (?, ?, ?, ?, ?) "
                     "ON CONFLICT (protocol, signal) DO UPDATE SET last_ms = COALESCE(excluded.last_ms, last_ms), "
                     "accepted = accepted + excluded.accepted, rejected = rejected + excluded.rejected",
                     dataclasses.astuple(receipt))

    @staticmethod
    def _not_resent(conn: sqlite3.Connection, table: str, columns: tuple[str, ...], rows: list[tuple]) -> list[tuple]:
        """`rows` less the undated ones their session has stored already (see UNDATED_SEQ); the name narrows
        the search to a metric series (its index is session, name, ts)."""
        ts, session, seq, name = (columns.index(c) if c in columns else None for c in ("ts", "session", "seq", "name"))
        sql = f"SELECT 1 FROM {table} WHERE session = ? AND ts BETWEEN ? AND ? AND seq = ?" + \
            (" AND name = ?" if name is not None else "")
        return [row for row in rows if row[seq] > UNDATED_SEQ or not conn.execute(
            sql, (row[session], row[ts] - RESEND_WINDOW_MS, row[ts], row[seq],
                  *([row[name]] if name is not None else []))).fetchone()]

    def _has_imported(self, conn: sqlite3.Connection) -> bool:
        """Whether any request was imported from a transcript (the partial index answers at once)."""
        if not self._imported:
            self._imported = conn.execute(f"SELECT 1 FROM requests WHERE {origin_in(TRANSCRIPT_ORIGINS)} LIMIT 1"
                                          ).fetchone() is not None
        return self._imported

    def import_requests(self, rows: list[tuple], projects: dict[str, str], user: str,
                        timeout: float = 60.0) -> ImportCounts:
        """Store requests read from transcripts (REQUEST_COLUMNS tuples, origin 2 or 3) durably, and count them. A
        row whose request_id is stored already (in its session, by an earlier import in any session, or by
        telemetry in any session near its time) or whose key is, is skipped. A session the server knows keeps its
        user; others get `user`. Written IMPORT_CHUNK rows a transaction, so telemetry is stored in between;
        `timeout` bounds each. Raises ImportInterrupted (with what was stored) when a chunk cannot be written."""
        window = CopyWindow(rows)
        self._copy_windows.add(window)  # from here on the writer adds the telemetry it stores to it
        stored = ImportCounts(0, 0)
        try:
            while not self._job(lambda conn: window.read(conn, COPY_SCAN_CHUNK), timeout):
                pass  # one transaction per COPY_SCAN_CHUNK rows read
            for first in range(0, len(rows), IMPORT_CHUNK):
                chunk = rows[first:first + IMPORT_CHUNK]
                counts = self._job(lambda conn: self._import(conn, chunk, projects, user, window), timeout)
                stored = ImportCounts(stored.imported + counts.imported, stored.already_known + counts.already_known)
        except StorageUnavailable as exc:
            raise ImportInterrupted(stored, len(rows), exc) from None
        finally:
            self._copy_windows.discard(window)
        return stored

    def _job(self, job: Callable[[sqlite3.Connection], Any], timeout: float) -> Any:
        try:
            return self.submit(job, timeout=10).result(timeout=timeout)
        except futures.TimeoutError:
            raise StorageUnavailable("the database did not commit in time") from None

    def _import(self, conn: sqlite3.Connection, rows: list[tuple], projects: dict[str, str],
                user: str, window: CopyWindow) -> ImportCounts:
        sessions = [self._intern(conn, "sessions", "session_id", session_id) for session_id in {row[1] for row in rows}]
        agent = REQUEST_COLUMNS.index("agent")
        with counters_kept(conn, {*sessions, *self._metrics_sessions(conn, {row[agent] for row in rows})}):
            return self._import_chunk(conn, rows, projects, user, window)

    def _import_chunk(self, conn: sqlite3.Connection, rows: list[tuple], projects: dict[str, str],
                      user: str, window: CopyWindow) -> ImportCounts:
        users = {}  # a known session's user, as session_usage names it (counters_kept has settled it)
        origin = REQUEST_COLUMNS.index("origin")
        replaced = frozenset().union(*map(replaced_by, {row[origin] for row in rows})) - REQUEST_ORIGINS
        for session_id in {row[1] for row in rows}:
            session = self._intern(conn, "sessions", "session_id", session_id)
            known = conn.execute("SELECT u.name FROM session_usage su JOIN users u ON u.id = su.user WHERE "
                                 "su.session = ? ORDER BY su.last_ts DESC LIMIT 1", (session,)).fetchone()
            users[session_id] = known[0] if known else user
            conn.execute(f"DELETE FROM requests WHERE session = ? AND {origin_in(replaced)}",
                         (session,))  # requests win over metric-derived usage, as events do
            if projects.get(session_id):
                conn.execute("UPDATE sessions SET project = ? WHERE id = ? AND project IS NULL",
                             (projects[session_id], session))
        user_index, request_id = REQUEST_COLUMNS.index("user"), REQUEST_COLUMNS.index("request_id")
        agent, by_telemetry = REQUEST_COLUMNS.index("agent"), joined_by_session(conn, rows)
        with_users = [row[:user_index] + (users[row[1]],) + row[user_index + 1:] for row in rows
                      if not window.has(row[request_id], row[0]) and (row[1], row[agent]) not in by_telemetry]
        self._replace_session_less_metrics(conn, with_users)  # a history wins as events do
        resolved = self._resolve(conn, "requests", REQUEST_COLUMNS, with_users)
        model = REQUEST_COLUMNS.index("model")
        self._own_models(conn, {(row[model], row[agent]) for row in resolved})  # as telemetry's calls name them
        stored, fresh = session_request_ids(conn, ((row[0], row[1]) for row in resolved)), []
        for row in resolved:  # those whose request_id their session has not stored (nor an earlier one of these)
            if row[request_id] is not None:
                if (row[1], row[request_id]) in stored:
                    continue
                stored.add((row[1], row[request_id]))
            fresh.append([*row, row[request_id]])
        sql = (f"INSERT OR IGNORE INTO requests ({', '.join(REQUEST_COLUMNS)}) SELECT "
               f"{', '.join('?' * len(REQUEST_COLUMNS))} WHERE ?R IS NULL OR NOT {REQUEST_ID_IMPORTED}").replace(
            "?R", f"?{len(REQUEST_COLUMNS) + 1}")
        imported = insert_requests(conn, sql, fresh) if fresh else 0
        if imported:
            self._imported = True
        return ImportCounts(imported, len(rows) - imported)

    def _price_turn(self, conn: sqlite3.Connection, session_id: str, turn_id: str, cost: int) -> None:
        """Codex's own cost of a turn replaces ccmon's estimates of the turn's responses: its conversation's responses
        still estimated from the turn's start (the time in its UUIDv7 id) up to the conversation's next user prompt,
        shared in proportion to the estimates. Nothing when none are stored (or the id tells no time): the estimates
        stay."""
        start = uuid7_ms(turn_id)
        session = self._intern(conn, "sessions", "session_id", session_id)
        rows = conn.execute(f"SELECT id, {', '.join(REQUEST_COLUMNS)} FROM requests WHERE session = ? AND ts >= ? AND "
                            f"origin = {ORIGIN_EVENT_ESTIMATED} ORDER BY ts, id", (session, start)).fetchall() \
            if start is not None else []
        if not rows:
            return
        ts, cost_at, origin = (1 + REQUEST_COLUMNS.index(c) for c in ("ts", "cost_nanos", "origin"))
        next_prompt = conn.execute("SELECT MIN(ts) FROM events WHERE session = ? AND name = 'codex.user_prompt' AND "
                                   "ts > ?", (session, rows[0][ts])).fetchone()[0]
        turn = [row for row in rows if next_prompt is None or row[ts] < next_prompt]
        conn.execute(f"DELETE FROM requests WHERE id IN ({', '.join('?' * len(turn))})", [row[0] for row in turn])
        priced = [row[1:cost_at] + (share,) + row[cost_at + 1:origin] + (ORIGIN_EVENT,) + row[origin + 1:]
                  for row, share in zip(turn, shares(cost, [row[cost_at] for row in turn]))]
        conn.executemany(insert_sql("requests", REQUEST_COLUMNS), priced)  # re-inserted: the rollups count them

    def _own_models(self, conn: sqlite3.Connection, models: set[tuple[int, int]]) -> None:
        """Name the agent of these (model id, agent id) pairs' models, where another agent's (see Split): a model is
        the agent's whose usage first named it, so one that already has usage stays whose it was (another agent
        naming claude-sonnet-4-5, or `unknown`, takes no usage away from Claude Code)."""
        claude = self._intern(conn, "agents", "name", CLAUDE_CODE)
        if any(agent != claude for _, agent in models):
            settle_rollups(conn)  # total_daily with this transaction's usage in it
        for model, agent in models:
            if agent != claude:
                conn.execute("UPDATE models SET agent = ? WHERE id = ? AND agent != ? AND NOT EXISTS (SELECT 1 FROM "
                             "total_daily WHERE model = ?)", (agent, model, agent, model))

    def _replace_session_less_metrics(self, conn: sqlite3.Connection, rows: list[tuple]) -> None:
        """Delete what another agent's session-less metrics counted near these rows' calls (events, or history) of
        the same agent and user (see METRICS_SESSION_WINDOW_MS)."""
        agent, user, origin = (REQUEST_COLUMNS.index(c) for c in ("agent", "user", "origin"))
        for row in rows:
            if row[agent] == CLAUDE_CODE or row[origin] not in AGENT_CALL_ORIGINS:
                continue
            conn.execute(
                f"DELETE FROM requests WHERE session = (SELECT id FROM sessions WHERE session_id = ?) AND ts BETWEEN "
                f"? AND ? AND origin = {ORIGIN_METRICS_ESTIMATED}",
                (metrics_session(row[agent], row[user]), row[0] - METRICS_SESSION_WINDOW_MS,
                 row[0] + METRICS_SESSION_WINDOW_MS))

    def _usage_from_metric(self, conn: sqlite3.Connection, point: dict) -> None:
        """Count a cost/token data point as usage for a session without model-call events (metrics-only users);
        a cumulative point counts by its difference to the previous point of its series. Another agent's point
        naming no session counts in the agent's metrics session of its user, unless that agent's events of the user
        are near (see METRICS_SESSION_WINDOW_MS); its cost is ccmon's estimate."""
        agent, fields = METRIC_USAGE_FIELDS.get((point["name"], point["type"]), ("", {}))
        session = point["session"]
        if session == self._intern(conn, "sessions", "session_id", "") and agent not in ("", CLAUDE_CODE):
            session = self._metrics_session_of(conn, agent, point["user"])
            if conn.execute(f"SELECT 1 FROM requests WHERE ts BETWEEN ? AND ? AND agent = ? AND user = ? AND "
                            f"{origin_in(AGENT_CALL_ORIGINS)} LIMIT 1",
                            (point["ts"] - METRICS_SESSION_WINDOW_MS, point["ts"] + METRICS_SESSION_WINDOW_MS,
                             self._intern(conn, "agents", "name", agent), point["user"])).fetchone():
                return  # that agent's events (or history) of this user win
        if not fields or session == self._intern(conn, "sessions", "session_id", "") or \
                conn.execute(f"SELECT 1 FROM requests WHERE session = ? AND {METRIC_USAGE_REPLACED_BY} LIMIT 1",
                             (session,)).fetchone():
            return  # not usage, no session to tell events from metrics (not counted), or events win
        value = point["value"]
        if point["temporality"] == 2:  # cumulative: the increase over the highest value the series had so far
            highest = conn.execute(
                "SELECT MAX(value) FROM metric_points WHERE session = ? AND name = ? AND model IS ? AND type IS ? "
                "AND start_ts IS ? AND NOT (ts = ? AND seq = ?)",
                (point["session"], point["name"], point["model"], point["type"], point["start_ts"], point["ts"],
                 point["seq"])).fetchone()[0]
            value = max(0.0, value - highest) if highest is not None else value
        if value <= 0:
            return  # a repeated cumulative point: nothing new
        figures = dict.fromkeys(USAGE_COLUMNS, 0)
        try:
            amount = parse_usd_nanos(value, "cost") if "cost_nanos" in fields else parse_count(round(value), "tokens")
        except BadValue:
            return  # stored as a point, too large to be usage
        if amount > (MAX_REQUEST_USD * NANOS_PER_USD if "cost_nanos" in fields else MAX_REQUEST_TOKENS):
            return  # the same: more than usage can be in one point (see MAX_REQUEST_TOKENS)
        for field, sign in fields.items():
            figures[field] = sign * amount
        model = point["model"] or "unknown"
        if agent != CLAUDE_CODE:
            figures["cost_nanos"] = estimated_cost(model, *(figures[column] for column in USAGE_COLUMNS[:4]),
                                                   self.prices)
        row = {"ts": point["ts"], "session": session, "seq": point["seq"],
               "model": self._intern(conn, "models", "name", model), "user": point["user"],
               **figures, "ttft_ms": None, "prompt_id": None, "request_id": None, "source": point["source"],
               "extra": None, "origin": ORIGIN_METRICS if agent == CLAUDE_CODE else ORIGIN_METRICS_ESTIMATED,
               "agent": self._intern(conn, "agents", "name", agent)}
        self._own_models(conn, {(row["model"], row["agent"])})
        conn.execute(insert_sql("requests", REQUEST_COLUMNS), [row[c] for c in REQUEST_COLUMNS])

    def sweep(self, older_than_ms: int) -> int:
        """Delete rows older than the cutoff, a chunk per transaction so ingestion keeps flowing."""
        deleted = 0
        for table in RETENTION_TABLES:
            while True:
                count = self.submit(lambda conn, t=table: self._delete_chunk(conn, t, older_than_ms),
                                    timeout=30).result(timeout=60)
                deleted += count
                if count < SWEEP_CHUNK:
                    break
        return deleted

    def _delete_chunk(self, conn: sqlite3.Connection, table: str, older_than_ms: int) -> int:
        chunk = conn.execute(f"SELECT id, session FROM {table} WHERE ts < ? ORDER BY ts LIMIT {SWEEP_CHUNK}",
                             (older_than_ms,)).fetchall()
        with counters_kept(conn, {session for _, session in chunk} if table == "requests" else ()):
            deleted = conn.execute(f"DELETE FROM {table} WHERE id IN (SELECT value FROM json_each(?)) "
                                   "RETURNING session", (json.dumps([id_ for id_, _ in chunk]),)).fetchall()
        if table == "requests":  # counters_kept has settled session_usage; it cannot know a session's new start
            for session in {session for session, in deleted}:
                conn.execute("UPDATE session_usage SET first_ts = (SELECT MIN(ts) FROM requests r WHERE r.session = "
                             "session_usage.session AND r.model = session_usage.model) WHERE session = ?", (session,))
        return len(deleted)

    def close(self, drain_s: float = 5.0) -> None:
        """Write what is queued (for up to `drain_s`; later jobs are answered "retry") and apply what waits, then
        close the database."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._staging.put(None)
        self._stager.join()  # what it acknowledged waits in the log: the writer applies it before it ends
        self._drain_until = time.monotonic() + drain_s
        while self._writer.is_alive():
            try:
                self._jobs.put(None, timeout=1)  # the writer is draining a full queue: wait for a place
                break
            except queue.Full:
                continue
        self._writer.join()
        self._committed.put(None)
        self._syncer.join()
        if self._file.replaced():  # else SQLite checkpoints as usual, or finds the -wal beside the file next time
            self._checkpoint()
        self._write_conn.close()
        os.close(self._wal)
        self._log.close()
        self._file.close()


# ---------------------------------------------------------------- Storage: reads

MAX_DAYS = 3660  # the days one GetUsage answers (ten years)


def period_parts(start: int, end: int, sizes: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Split [start, end) into (level, lo, hi) pieces: the largest aligned blocks of sizes[0] inside,
    then of sizes[1] around them, ..., and level len(sizes) (raw rows) for what is left at the edges."""
    if start >= end:
        return []
    if not sizes:
        return [(0, start, end)]
    lo, hi = -(-start // sizes[0]) * sizes[0], end // sizes[0] * sizes[0]
    if lo >= hi:
        return [(level + 1, a, b) for level, a, b in period_parts(start, end, sizes[1:])]
    edges = period_parts(start, lo, sizes[1:]) + period_parts(hi, end, sizes[1:])
    return [(0, lo, hi)] + [(level + 1, a, b) for level, a, b in edges]


def series_parts(lo: int, hi: int, everyone: bool) -> list[tuple[int, int, int, int]]:
    """[lo, hi) as signed (sign, level, a, b) parts: UTC days (level 0), hours (1, of `everyone`'s usage only: no
    rollup has hours per user), quarter hours (2) and raw rows (3). A bucket of a day or more is read from the UTC
    days nearest its edges, corrected by the hours (or quarter hours) between those and its edges, added or taken
    away: a local day of Berlin's is a UTC day, plus the hour before it and less its last hour (two in summer), not
    96 quarter hours."""
    sizes = (HOUR_MS, BUCKET_MS) if everyone else (BUCKET_MS,)

    def edge(sign: int, x: int, y: int) -> list[tuple[int, int, int, int]]:
        if x % sizes[0] == y % sizes[0] == 0:  # the usual edge, whole hours: one part or none (as period_parts)
            return [(sign, 3 - len(sizes), x, y)] if x < y else []
        return [(sign, level + 3 - len(sizes), p, q) for level, p, q in period_parts(x, y, sizes)]

    a, b = (-(-(edge_ms - DAY_MS // 2) // DAY_MS) * DAY_MS for edge_ms in (lo, hi))  # nearest UTC midnights
    if a >= b:
        return edge(1, lo, hi)
    return [(1, 0, a, b)] + [part for sign, x, y in ((1, lo, a), (-1, a, lo), (1, b, hi), (-1, hi, b))
                             for part in edge(sign, x, y)]


@dataclasses.dataclass
class BlockTally:
    """A block while its rows are summed (see Reader.blocks)."""
    start_ms: int
    end_ms: int
    by_model: dict[str, Usage]
    last_activity_ms: int
    from_claude: bool = False

    def block(self) -> UsageBlock:
        return UsageBlock(self.start_ms, self.end_ms, Split.from_models(self.by_model), self.last_activity_ms,
                          self.from_claude)


def session_source(imported: int, from_metrics: bool, imported_requests: int = 0, requests: int = 0,
                   estimated: bool = False) -> str:
    """Where most of a session's usage comes from, given the lowest origin of its requests imported from transcripts
    (0 when none) and how many of its `requests` were: transcript (transcript* when ccmon priced some, estimated)
    when most were imported; else events or metrics (events* or metrics* when ccmon priced some of another agent's,
    `estimated`), with +tx when some were (a lost turn re-imported)."""
    if imported and imported_requests * 2 > requests:
        return "transcript*" if imported == ORIGIN_TRANSCRIPT else "transcript"
    return ("metrics" if from_metrics else "events") + ("*" if estimated else "") + ("+tx" if imported else "")


# The models of agents other than Claude Code (agent 1): their usage is no Claude plan's or block's.
NOT_CLAUDES = "agent != 1"
CLAUDES_MODELS = f"model NOT IN (SELECT id FROM models WHERE {NOT_CLAUDES})"

# Each agent's event of one tool call (Claude Code's named without its prefix): the tool is its tool_name or
# function_name, its outcome `success` and its time `duration_ms`, in each; and of one failed API call.
TOOL_CALL_EVENTS = {"tool_result": CLAUDE_CODE, "gemini_cli.tool_call": GEMINI_CLI, "codex.tool_result": CODEX,
                    "qwen-code.tool_call": QWEN_CODE}
API_ERROR_EVENTS = {"api_error": CLAUDE_CODE, "gemini_cli.api_error": GEMINI_CLI, "qwen-code.api_error": QWEN_CODE}
TOOL_NAME = "COALESCE(json_extract(attributes, '$.tool_name'), json_extract(attributes, '$.function_name'), '?')"


def event_names(events: dict[str, str], agent: str | None) -> str:
    """The SQL list of the names of these events (see TOOL_CALL_EVENTS) of one agent, or of every agent."""
    return ", ".join(f"'{name}'" for name, whose in events.items() if agent in (None, whose))


# Claude Code sends success as "true"/"false" (older versions) or a boolean; Codex as "true"/"false".
FAILED_TOOL = "COALESCE(json_extract(attributes, '$.success') IN ('false', 'False', 0), 0)"


class ReadConnection(sqlite3.Connection):
    """A Reader's connection: a class of its own so that the Reader can hold it by a weak reference (Python's
    sqlite3.Connection cannot be), and count the queries under way on it (see closing_after_queries). It is
    closed with its thread or at Reader.close(), whichever comes first."""
    queries = 0


def closing_after_queries(cls: type) -> type:
    """Wrap every public method of the Reader so that its thread's connection counts as in use while it runs:
    Reader.close() must not close a connection under a query (Python's sqlite3 reads the closed handle once the
    query's step returns, and the process crashes); the query closes it when it ends. Each call so gets its
    connection first, and the check that the database is still at its path, even one the cache answers; before
    them, the writer applies what it has acknowledged but not applied yet (see Writer.catch_up)."""
    def wrapped(method: Callable) -> Callable:
        @functools.wraps(method)
        def query(self, *args, **kwargs):
            self._catch_up()
            with self._lock:  # not between close()'s look at the connection and its closing it
                conn = self._reader()
                conn.queries += 1
            try:
                return method(self, *args, **kwargs)
            finally:
                with self._lock:
                    conn.queries -= 1
                    if self._closed and not conn.queries:
                        conn.close()
        return query

    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and name != "close" and inspect.isfunction(member):
            setattr(cls, name, wrapped(member))
    return cls


@closing_after_queries
class Reader:
    """Queries over the database, each on its thread's own read-only connection (SQLite's WAL lets them run
    while the writer commits)."""

    def __init__(self, path: Path, moved: Callable[[], str] = lambda: "", buckets: BucketCache | None = None,
                 catch_up: Callable[[], None] = lambda: None):
        self.path = path
        self._moved = moved  # the server's check that its database file is still at the path
        self._catch_up = catch_up  # the writer's: see Writer.catch_up
        self._bucket_cache = buckets  # the writer's, which knows what changed: without one, nothing is kept
        self._connections = threading.local()
        self._open: weakref.WeakSet[ReadConnection] = weakref.WeakSet()  # every thread's, for close()
        self._lock = threading.RLock()  # held by a query while it gets its connection, which may open one
        self._closed = False

    def _reader(self) -> sqlite3.Connection:
        gone = self._moved()
        if gone:  # a connection opened now would read another file, or none
            raise DatabaseMoved(f"the database file the server writes is no longer at its path ({gone}); stop the "
                                f"server and put the file back at {self.path}: it holds everything acknowledged")
        conn = getattr(self._connections, "conn", None)
        if conn is not None and (conn.queries or not self._closed):  # a query under way at close() may finish
            return conn
        with self._lock:
            if self._closed:
                raise sqlite3.ProgrammingError("the server is stopping")
            conn = self._connections.conn = connect(self.path, readonly=True, factory=ReadConnection)
            self._open.add(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection (one with a query under way, when that query ends): at the server's stop,
        before the writer's, so that the writer's is the last one and SQLite copies the -wal into the database and
        removes the -wal and -shm files."""
        with self._lock:
            self._closed = True
            for conn in list(self._open):
                if not conn.queries:
                    conn.close()

    def _user_filter(self, user: str | None, column: str = "user") -> tuple[str, tuple] | None:
        """The SQL condition for one user's rows: ('', ()) for everyone, None for a user never seen (no rows)."""
        if user is None:
            return "", ()
        row = self._reader().execute("SELECT id FROM users WHERE name = ?", (user,)).fetchone()
        return (f" AND {column} = ?", (row[0],)) if row else None

    @staticmethod
    def _project_filter(project: str | None, column: str = "session") -> tuple[str, tuple]:
        """The SQL condition for the rows of one project's sessions ('', () for every project). A project is named
        by its stored value (a folder, or the name OTEL_RESOURCE_ATTRIBUTES gave) or by the end of its path:
        /home/dev/app is app, dev/app or /home/dev/app. The rollups have no project: a query with this
        condition reads rows that have a session column (raw rows, session_usage, events)."""
        if project is None:
            return "", ()
        return (f" AND {column} IN (SELECT id FROM sessions WHERE project = ? OR "
                "substr(project, -1 - length(?)) IN ('/' || ?, '\\' || ?))", (project,) * 4)

    @staticmethod
    def _agent_filter(agent: str | None, column: str = "model") -> tuple[str, tuple]:
        """The SQL condition for one agent's rows ('', () for every agent): the rows of its models, as Split tells
        agents apart (a model is the agent's whose usage first named it: see Writer._own_models)."""
        if agent is None:
            return "", ()
        return f" AND {column} IN (SELECT m.id FROM models m JOIN agents a ON a.id = m.agent WHERE a.name = ?)", \
            (agent,)

    def _filter(self, user: str | None, project: str | None, user_column: str = "user",
                session_column: str = "session", agent: str | None = None,
                model_column: str = "model") -> tuple[str, tuple] | None:
        """The conditions for one user's rows, one project's and one agent's, as _user_filter: None when there can
        be no rows."""
        chosen = self._user_filter(user, user_column)
        if chosen is None:
            return None
        parts = [chosen, self._project_filter(project, session_column), self._agent_filter(agent, model_column)]
        return "".join(where for where, _ in parts), tuple(param for _, params in parts for param in params)

    def usage(self, start_ms: int, end_ms: int, by: str = "model", user: str | None = None,
              project: str | None = None, agent: str | None = None) -> dict[Any, Usage]:
        """Totals per model (by='model'), per user ('user') or per (user, model) ('user, model') over
        [start_ms, end_ms): whole UTC days from usage_daily, whole quarter hours from usage_rollup around
        them, raw rows at the unaligned edges. One project's totals come from its sessions' raw rows."""
        chosen = self._filter(user, project, agent=agent)
        if chosen is None:
            return {}
        where, extra = chosen
        keys = [column.strip() for column in by.split(",")]
        rollup = f"SELECT {by}, {USAGE_SUMS} FROM {{table}} WHERE bucket >= ? AND bucket < ?{where} GROUP BY {by}"
        levels = [rollup.format(table="usage_daily"), rollup.format(table="usage_rollup"),
                  f"SELECT {by}, {RAW_SUMS} FROM requests WHERE ts >= ? AND ts < ?{where} GROUP BY {by}"]
        totals: dict[tuple, Usage] = {}
        conn = self._reader()
        conn.execute("BEGIN")  # one snapshot: a rollup and the raw rows it stands for agree
        try:
            parts = [self._whole_bucket(conn, *part) for part in period_parts(start_ms, end_ms, (DAY_MS, BUCKET_MS))] \
                if project is None else [(2, start_ms, end_ms)] * (start_ms < end_ms)  # raw rows only
            for level, lo, hi in parts:
                for row in conn.execute(levels[level], (lo, hi, *extra)):
                    key = tuple(row[:len(keys)])
                    totals[key] = totals.get(key, Usage()) + Usage(*row[len(keys):])
        finally:
            if conn.in_transaction:  # SQLite may have ended it on an error already
                conn.execute("COMMIT")
        names = {column: self._names(column + "s") for column in keys}
        named = {tuple(names[c][k] for c, k in zip(keys, key)): u for key, u in totals.items() if u != Usage()}
        return {key[0] if len(keys) == 1 else key: u for key, u in named.items()}

    def series(self, starts: list[int], start_ms: int, end_ms: int, by: str = "", user: str | None = None,
               project: str | None = None, agent: str | None = None) -> list[SeriesPoint]:
        """The usage of each bucket [starts[i], starts[i + 1]) within [start_ms, end_ms), per model, user or
        project (by) or not grouped (''), oldest first, empty buckets left out. From the rollups (see series_parts):
        the UTC days in one range, the hours (of one user: quarter hours) at the buckets' edges in one query, each
        read once (a local day's end is the next one's start); by or of a project, from the raw rows (the rollups
        have no project). Buckets read before and unchanged since come from the BucketCache, but a project's (its
        sessions' project may change with no row changed)."""
        chosen = self._filter(user, project, "t.user", "t.session", agent, "t.model")
        if chosen is None:
            return []
        where, extra = chosen
        raw = project is not None or by == "project"
        everyone = user is None and by in ("", "model")  # the total_ rollups have no user
        shape = None if raw or self._bucket_cache is None else (by, user or "", agent or "")  # comparable
        commits = self._bucket_cache.commits() if shape else 0  # before the snapshot starts
        buckets = {index: (start, end, max(start, start_ms), min(end, end_ms))
                   for index, (start, end) in enumerate(zip(starts, starts[1:]))}
        known = {index: points for index, (start, end, lo, hi) in buckets.items() if shape and (lo, hi) == (start, end)
                 and (points := self._bucket_cache.points(shape, start, end)) is not None}
        if len(known) == len(buckets):
            return [point for index in buckets for point in known[index]]
        uses: list[dict[tuple[int, int], list[tuple[int, int]]]] = [{}, {}, {}, {}]  # level: range -> (bucket, sign)
        for index, (_, _, lo, hi) in buckets.items():
            if index in known:
                continue
            for sign, level, a, b in ([(1, 3, lo, hi)] if lo < hi else []) if raw else series_parts(lo, hi, everyone):
                uses[level].setdefault((a, b), []).append((index, sign))
        group = {"": "''", "model": "t.model", "user": "t.user", "project": "COALESCE(s.project, '')"}[by]
        keys = "1, 3" if by == "" else "1, 2, 3"  # a constant in GROUP BY would cost a sort
        join = " JOIN sessions s ON s.id = t.session" if by == "project" else ""
        day_uses = {day: used for (a, b), used in uses[0].items() for day in range(a, b, DAY_MS)}
        found: dict[tuple[int, Any], list[list[int]]] = {}  # (bucket, group) -> [base, premium, other figures]
        conn = self._reader()
        conn.execute("BEGIN")  # one snapshot: the models, a rollup and the raw rows it stands for agree
        try:
            others, sides = self.other_models(), {1: [], 2: []}  # a model's side of Split, as Split.from_models
            for model, name in self._names("models").items():
                if name in others or is_premium(name):
                    sides[2 if name in others else 1].append(str(model))
            side = "".join(f"WHEN t.model IN ({', '.join(ids)}) THEN {number} " for number, ids in sides.items() if ids)
            side = f"CASE {side}ELSE 0 END" if side else "0"  # the sides summed apart, not each model
            queries = [(f"SELECT t.bucket, {group}, {side}, {USAGE_SUMS} FROM {'total' if everyone else 'usage'}_daily "
                        f"t WHERE t.bucket >= ? AND t.bucket < ?{where} GROUP BY {keys}",
                        (min(day_uses, default=0), max(day_uses, default=-DAY_MS) + DAY_MS))]
            for level, table, column, sums in ((1, "total_hourly", "t.bucket", USAGE_SUMS),
                                               (2, "usage_rollup", "t.bucket", USAGE_SUMS),
                                               (3, "requests", "t.ts", RAW_SUMS)):
                queries.append((  # MATERIALIZED: the ranges read from JSON once, not at every row they are joined to
                    "WITH p (i, lo, hi) AS MATERIALIZED (SELECT key, json_extract(value, '$[0]'), json_extract(value, "
                    f"'$[1]') FROM json_each(?)) SELECT p.i, {group}, {side}, {sums} FROM p CROSS JOIN {table} t "
                    f"ON {column} >= p.lo AND {column} < p.hi{join} WHERE 1{where} GROUP BY {keys}",
                    (json.dumps(list(uses[level])),)))
            for level, (sql, bounds) in enumerate(queries):
                if not uses[level]:
                    continue
                uses_of = day_uses if level == 0 else dict(enumerate(uses[level].values()))  # a row's part -> uses
                for part, key, side, *figures in conn.execute(sql, (*bounds, *extra)):
                    for index, sign in uses_of.get(part, ()):
                        if (tally := found.get((index, key))) is None:
                            tally = found[index, key] = [[0] * len(figures), [0] * len(figures), [0] * len(figures)]
                        tally[side] = list(map(int.__add__ if sign > 0 else int.__sub__, tally[side], figures))
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")
        names = self._names("models") if by == "model" else self._names("users") if by == "user" else {}
        read: dict[int, list[SeriesPoint]] = {index: [] for index in buckets if index not in known}
        for (index, key), sides in found.items():
            if any(map(any, sides)):
                read[index].append(SeriesPoint(starts[index], names.get(key, key), Split(**{  # an empty side: the
                    side: Usage(*figures) for side, figures in zip(SPLIT_SIDES, sides) if any(figures)})))  # default
        read = {index: tuple(sorted(points, key=lambda point: point.group)) for index, points in read.items()}
        if shape:  # whole buckets only (see BucketCache)
            self._bucket_cache.keep(commits, shape, {(start, end): read[index] for index, (start, end, lo, hi)
                                                     in buckets.items() if index in read and (lo, hi) == (start, end)})
        return [point for index in buckets for point in (known[index] if index in known else read[index])]

    @staticmethod
    def _whole_bucket(conn: sqlite3.Connection, level: int, lo: int, hi: int) -> tuple[int, int, int]:
        """A raw-rows part of a period (see period_parts) inside one quarter hour as that quarter hour's rollup when
        no row of the quarter hour lies outside the part, as for a period ending now: the rollup is then exact, and
        one row instead of every row so far (thousands at full ingestion)."""
        bucket = lo - lo % BUCKET_MS
        if level != 2 or hi > bucket + BUCKET_MS:
            return level, lo, hi
        outside = conn.execute("SELECT EXISTS (SELECT 1 FROM requests WHERE ts >= ? AND ts < ?) OR EXISTS (SELECT 1 "
                               "FROM requests WHERE ts >= ? AND ts < ?)", (bucket, lo, hi, bucket + BUCKET_MS))
        return (2, lo, hi) if outside.fetchone()[0] else (1, bucket, bucket + BUCKET_MS)

    def model_agents(self) -> dict[str, str]:
        """The other agents' models (see Split): name -> agent."""
        return dict(self._reader().execute(f"SELECT m.name, a.name FROM models m JOIN agents a ON a.id = m.agent "
                                           f"WHERE m.{NOT_CLAUDES}"))

    def other_models(self) -> frozenset[str]:
        return frozenset(self.model_agents())

    def split(self, by_model: dict[str, Usage]) -> Split:
        return Split.from_models(by_model, self.other_models())

    def _names(self, table: str) -> dict[int, str]:
        return dict(self._reader().execute(f"SELECT id, {'session_id' if table == 'sessions' else 'name'} "
                                           f"FROM {table}"))

    def models(self, start_ms: int, end_ms: int, user: str | None = None, project: str | None = None,
               agent: str | None = None) -> list[ModelUsage]:
        """Each model's usage in the period, highest cost first."""
        by_model, agents = self.usage(start_ms, end_ms, user=user, project=project, agent=agent), self.model_agents()
        return [ModelUsage(model, usage, agents.get(model, CLAUDE_CODE)) for model, usage in
                sorted(by_model.items(), key=lambda item: (-item[1].cost_nanos, item[0]))]

    def days(self, zone: ZoneInfo, start_ms: int | None, end_ms: int, user: str | None = None,
             project: str | None = None, agent: str | None = None) -> list[DayUsage]:
        """Each calendar day's usage in `zone`, newest first: the days from the one holding start_ms to the one
        holding end_ms - 1, cut to the period, the newest MAX_DAYS of them; without start_ms, the last 30 days
        (today up to end_ms). Raises OverflowError or ValueError when a day's end falls past the year 9999, which
        dates cannot show."""
        days = 30
        if start_ms is not None:
            first, last = (dt.datetime.fromtimestamp(ms / 1000, zone).date()
                           for ms in (start_ms, max(start_ms, end_ms - 1)))
            days = min(MAX_DAYS, (last - first).days + 1)
        found = []
        for date, lo, hi in day_bounds(zone, max(end_ms - 1, 0), days):
            lo, hi = max(lo, -1 if start_ms is None else start_ms), min(hi, end_ms)
            if lo < hi or start_ms is None:
                found.append(DayUsage(date, self.split(self.usage(lo, hi, user=user, project=project, agent=agent))))
        return found

    def requests_page(self, start_ms: int, end_ms: int, limit: int, offset: int, oldest_first: bool,
                      user: str | None = None, project: str | None = None,
                      agent: str | None = None) -> list[ApiRequest]:
        chosen = self._filter(user, project, "r.user", "r.session", agent, "r.model")
        if chosen is None:
            return []
        where, extra = chosen
        order = "ASC" if oldest_first else "DESC"
        sql = (f"SELECT s.session_id, r.ts, m.name, a.name, {ROW_FIGURES} FROM requests r "
               "JOIN sessions s ON s.id = r.session JOIN models m ON m.id = r.model JOIN agents a ON a.id = r.agent "
               f"WHERE r.ts >= ? AND r.ts < ? AND {origin_in(REQUEST_ORIGINS, 'r.origin')}{where} "
               f"ORDER BY r.ts {order}, r.id {order} LIMIT ? OFFSET ?")
        params = (start_ms, end_ms, *extra, limit, max(offset, 0))
        return [ApiRequest(ts, model, session, Usage(*figures), agent)
                for session, ts, model, agent, *figures in self._reader().execute(sql, params)]

    def session_user(self, session_id: str) -> str | None:
        """The user of a session, once its events have arrived."""
        row = self._reader().execute(
            "SELECT u.name FROM session_usage su JOIN users u ON u.id = su.user JOIN sessions s ON s.id = su.session "
            "WHERE s.session_id = ? ORDER BY su.last_ts DESC LIMIT 1", (session_id,)).fetchone()
        return row[0] if row else None

    def readings(self, user: str | None, since_ms: int, until_ms: int, limit: int = 1,
                 with_limits: bool = False, agent: str = CLAUDE_CODE) -> list[LimitReading]:
        """Status line readings of `user`'s sessions (or everyone's), newest first; with_limits: only those with
        a 5-hour or weekly window of Claude's. Of another agent: the readings of its own plan's limits."""
        chosen = self._of_user(user)
        if chosen is None:
            return []
        of_user, params = chosen
        of_user, params = " AND lr.agent = (SELECT id FROM agents WHERE name = ?)" + of_user, (agent, *params)
        if with_limits:
            of_user += " AND (lr.five_hour_percent IS NOT NULL OR lr.seven_day_percent IS NOT NULL)"
        rows = self._reader().execute(
            f"SELECT s.session_id, lr.ts, lr.project, lr.model, lr.context_percent, lr.five_hour_percent, "
            f"lr.five_hour_resets, lr.seven_day_percent, lr.seven_day_resets, lr.spend_limit, lr.version "
            f"FROM limit_readings lr JOIN sessions s ON s.id = lr.session WHERE lr.ts >= ? AND lr.ts <= ?{of_user} "
            "ORDER BY lr.ts DESC, lr.id DESC LIMIT ?", (since_ms, until_ms, *params, limit)).fetchall()
        users = {sid: user for sid in {row[0] for row in rows}} if user is not None else \
            {sid: self.session_user(sid) for sid in {row[0] for row in rows}}  # once per session, not per reading
        return [LimitReading(sid, ts, project or "", model or "", context,
                             LimitWindow(five, five_resets) if five is not None else None,
                             LimitWindow(seven, seven_resets) if seven is not None else None,
                             LimitWindow(**json.loads(spend)) if spend else None, version or "", users[sid] or "",
                             agent)
                for sid, ts, project, model, context, five, five_resets, seven, seven_resets, spend, version in rows]

    def named_claude_users(self, since_ms: int, limit: int = 2) -> list[str]:
        """Up to `limit` users with a name who have Claude Code usage since the UTC day of since_ms."""
        return [name for name, in self._reader().execute(
            "SELECT DISTINCT u.name FROM usage_daily d JOIN users u ON u.id = d.user JOIN models m ON m.id = d.model "
            "WHERE d.bucket >= ? AND m.agent = ? AND u.name != '' LIMIT ?",
            (since_ms - since_ms % DAY_MS, CLAUDE_AGENT_ID, limit))]

    def _of_user(self, user: str | None) -> tuple[str, tuple] | None:
        """The SQL condition for readings (alias lr) of `user`'s sessions: ('', ()) for everyone, None for a user
        never seen."""
        chosen = self._user_filter(user, "su.user")
        if chosen is None or not chosen[0]:
            return chosen
        return f" AND lr.session IN (SELECT su.session FROM session_usage su WHERE 1{chosen[0]})", chosen[1]

    def claude_windows(self, user: str | None, start_ms: int, end_ms: int) -> list[tuple[int, int]]:
        """Claude's own 5-hour windows overlapping [start_ms, end_ms) as readings of `user`'s sessions (or
        everyone's) reported them: [resets - 5 hours, resets), oldest first. Of windows that overlap (a reset time
        read a second apart), the earlier stands."""
        chosen = self._of_user(user)
        if chosen is None:
            return []
        where, params = chosen
        resets = self._reader().execute(
            f"SELECT DISTINCT lr.five_hour_resets FROM limit_readings lr WHERE lr.ts >= ? AND lr.ts < ? "
            f"AND lr.five_hour_resets > ? AND lr.five_hour_resets < ? AND lr.agent = {CLAUDE_AGENT_ID}{where} "
            "ORDER BY 1",
            (start_ms - BLOCK_MS, end_ms + BLOCK_MS, start_ms, end_ms + BLOCK_MS, *params)).fetchall()
        windows: list[tuple[int, int]] = []
        for reset, in resets:
            if not windows or reset - BLOCK_MS >= windows[-1][1]:
                windows.append((reset - BLOCK_MS, reset))
        return windows

    def live_limits(self, at_ms: int, agent: str = CLAUDE_CODE) -> dict[str, ClaudeLimits]:
        """Each user's newest reading (up to `at_ms`) of their sessions' that has a five_hour window not reset by
        then, and the same of seven_day (each reading with that window alone), by user name: of Claude's limits, or
        of another agent's own plan's (Codex's)."""
        found: dict[str, dict[str, LimitReading]] = {}
        for column, span in (("five_hour", BLOCK_MS), ("seven_day", 7 * DAY_MS)):
            rows = self._reader().execute(
                f"SELECT u.name, s.session_id, lr.ts, lr.{column}_percent, lr.{column}_resets FROM limit_readings lr "
                "JOIN users u ON u.id = (SELECT su.user FROM session_usage su WHERE su.session = lr.session "
                "ORDER BY su.last_ts DESC LIMIT 1) "  # the session's latest user, looked up by its key
                "JOIN sessions s ON s.id = lr.session "
                f"WHERE lr.ts > ? AND lr.ts <= ? AND lr.{column}_resets > ? AND lr.agent = (SELECT id FROM agents "
                "WHERE name = ?) ORDER BY lr.ts DESC, lr.id DESC", (at_ms - span, at_ms, at_ms, agent))
            for user, session_id, read_ms, percent, resets in rows:
                found.setdefault(user, {}).setdefault(column, LimitReading(
                    session_id, read_ms, user=user, **{column: LimitWindow(percent, resets)}))
        return {user: ClaudeLimits(readings.get("five_hour"), readings.get("seven_day"))
                for user, readings in sorted(found.items())}

    def latest_session(self) -> str | None:
        row = self._reader().execute("SELECT s.session_id FROM requests r JOIN sessions s ON s.id = r.session "
                                     "ORDER BY r.ts DESC, r.id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def sessions(self, start_ms: int, end_ms: int, user: str | None = None, limit: int = 500,
                 session_id: str | None = None, project: str | None = None,
                 agent: str | None = None) -> list[Session]:
        """Sessions with requests in [start_ms, end_ms) (or the one named), most recent first, with their totals."""
        chosen_user = self._filter(user, project, agent=agent)
        if chosen_user is None:
            return []
        if session_id is not None:
            chosen = "SELECT id FROM sessions WHERE session_id = ?"
            params: tuple = (session_id,)
        else:
            where, extra = chosen_user
            chosen = (f"SELECT session FROM session_usage WHERE last_ts >= ? AND first_ts < ?{where} "
                      "GROUP BY session ORDER BY MAX(last_ts) DESC LIMIT ?")
            params = (start_ms, end_ms, *extra, limit)
        conn = self._reader()
        rows = conn.execute(
            f"WITH chosen AS ({chosen}) SELECT su.session, s.session_id, u.name, m.name, su.first_ts, su.last_ts, "
            f"COALESCE(s.project, ''), su.rows, {', '.join(list(FIGURES)[1:])} FROM session_usage su JOIN chosen c ON c.{'id' if session_id is not None else 'session'} = su.session "
            "JOIN sessions s ON s.id = su.session JOIN models m ON m.id = su.model JOIN users u ON u.id = su.user",
            params).fetchall()
        grouped: dict[int, dict] = {}
        for key, sid, user_name_, model, first, last, project, count, *figures in rows:
            entry = grouped.setdefault(key, {"session_id": sid, "user": user_name_, "first": first, "last": last,
                                             "by_model": {}, "rows": 0, "project": project})
            entry["first"], entry["last"] = min(entry["first"], first), max(entry["last"], last)
            entry["by_model"][model] = Usage(*figures)
            entry["rows"] += count
        counts = self._event_counts(list(grouped))
        imported = self._imported_origins(list(grouped))
        agents, others = self._agents(list(grouped)), self.other_models()
        summaries = []
        for key, e in grouped.items():
            by_model, from_metrics = e["by_model"], sum(u.requests for u in e["by_model"].values()) < e["rows"]
            origin, imported_requests = imported.get(key, (0, 0))
            agent, estimated = agents[key]
            summaries.append(Session(e["session_id"], e["user"], e["first"], e["last"],
                                     Split.from_models(by_model, others),
                                     tuple(sorted(by_model, key=lambda m: (-by_model[m].cost_nanos, m))),
                                     *counts.get(key, (0, 0, 0)), from_metrics, e["project"],
                                     session_source(origin, from_metrics, imported_requests,
                                                    sum(u.requests for u in by_model.values()), estimated), agent))
        return sorted(summaries, key=lambda summary: (-summary.last_ms, summary.session_id))

    def _agents(self, sessions: list[int]) -> dict[int, tuple[str, bool]]:
        """Each session's agent (that of one of its rows: a session is one agent's), and whether ccmon priced any
        of its rows of another agent's (estimated; the partial index answers)."""
        found: dict[int, tuple[str, bool]] = {}
        for first in range(0, len(sessions), 500):
            chunk = sessions[first:first + 500]
            found.update((session, (agent, bool(estimated))) for session, agent, estimated in self._reader().execute(
                f"SELECT c.value, (SELECT a.name FROM requests r JOIN agents a ON a.id = r.agent WHERE r.session = "
                f"c.value LIMIT 1), EXISTS (SELECT 1 FROM requests r WHERE r.session = c.value AND "
                f"{origin_in(AGENT_ESTIMATED_ORIGINS, 'r.origin')}) FROM "
                f"json_each(?) c", (json.dumps(chunk),)))
        return found

    def _imported_origins(self, sessions: list[int]) -> dict[int, tuple[int, int]]:
        """The lowest origin of each session's requests imported from transcripts (ORIGIN_TRANSCRIPT, priced by
        ccmon, when any) and how many were imported."""
        found: dict[int, tuple[int, int]] = {}
        for first in range(0, len(sessions), 500):
            chunk = sessions[first:first + 500]
            found.update((session, (origin, count)) for session, origin, count in self._reader().execute(
                f"SELECT session, MIN(origin), COUNT(*) FROM requests WHERE {origin_in(TRANSCRIPT_ORIGINS)} AND "
                f"session IN ({', '.join('?' * len(chunk))}) GROUP BY session", chunk))
        return found

    def known_requests(self, rows: list[tuple]) -> int:
        """How many of these requests rows (REQUEST_COLUMNS, as ImportRequests reads them) are stored: by request_id
        (as Writer._import finds it), else by key."""
        conn, known = self._reader(), 0
        window = CopyWindow(rows)
        window.read(conn)
        imported = f"SELECT {REQUEST_ID_IMPORTED.replace('?R', '?')}"
        ids = {session_id: found[0] for session_id in {row[1] for row in rows} for found in conn.execute(
            "SELECT id FROM sessions WHERE session_id = ?", (session_id,))}
        stored = session_request_ids(conn, ((row[0], ids[row[1]]) for row in rows if row[1] in ids))
        request_id, agent = REQUEST_COLUMNS.index("request_id"), REQUEST_COLUMNS.index("agent")
        by_telemetry = joined_by_session(conn, rows)
        for row in rows:
            ts, session_id, seq, rid = row[0], row[1], row[2], row[request_id]
            if (session_id, row[agent]) in by_telemetry:
                known += 1
            elif rid and (window.has(rid, ts) or (ids.get(session_id), rid) in stored or
                          conn.execute(imported, (rid,)).fetchone()[0]):
                known += 1
            elif conn.execute("SELECT 1 FROM requests r JOIN sessions s ON s.id = r.session WHERE r.ts = ? AND "
                              "s.session_id = ? AND r.seq = ?", (ts, session_id, seq)).fetchone():
                known += 1
        return known

    def _event_counts(self, sessions: list[int]) -> dict[int, tuple[int, int, int]]:
        """(tool calls, failed tool calls, API errors) per session."""
        counts: dict[int, list[int]] = {}
        for first in range(0, len(sessions), 500):
            chunk = sessions[first:first + 500]
            for session, name, total, failed in self._reader().execute(
                    f"SELECT session, name, COUNT(*), SUM({FAILED_TOOL}) FROM events WHERE session IN "
                    f"({', '.join('?' * len(chunk))}) AND name IN ({event_names(TOOL_CALL_EVENTS, None)}, "
                    f"{event_names(API_ERROR_EVENTS, None)}) GROUP BY session, name", chunk):
                entry = counts.setdefault(session, [0, 0, 0])  # a session is one agent's: one name of each kind
                if name in TOOL_CALL_EVENTS:
                    entry[0], entry[1] = total, failed
                else:
                    entry[2] = total
        return {session: tuple(entry) for session, entry in counts.items()}

    def timeline(self, session_id: str, limit: int = 2000) -> list[TimelineEntry]:
        """A session's requests and events in order."""
        conn = self._reader()
        row = conn.execute("SELECT id FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        if row is None:
            return []
        requests = [TimelineEntry(r.ts_ms, "api_request", r, {}) for r in self._session_requests(row[0], limit)]
        events = [TimelineEntry(ts, name, None, json.loads(attributes) if attributes else {})
                  for ts, name, attributes in conn.execute(
                      "SELECT ts, name, attributes FROM events WHERE session = ? ORDER BY ts LIMIT ?", (row[0], limit))]
        return sorted(requests + events, key=lambda entry: entry.ts_ms)[:limit]

    def _session_requests(self, session: int, limit: int) -> list[ApiRequest]:
        sql = (f"SELECT s.session_id, r.ts, m.name, a.name, {ROW_FIGURES} FROM requests r JOIN sessions s ON "
               "s.id = r.session JOIN models m ON m.id = r.model JOIN agents a ON a.id = r.agent WHERE r.session = ? "
               f"AND {origin_in(REQUEST_ORIGINS, 'r.origin')} ORDER BY r.ts LIMIT ?")
        return [ApiRequest(ts, model, sid, Usage(*figures), agent)
                for sid, ts, model, agent, *figures in self._reader().execute(sql, (session, limit))]

    def tool_report(self, start_ms: int, end_ms: int, user: str | None = None, project: str | None = None,
                    agent: str | None = None) -> ToolReport:
        chosen = self._filter(user, project)
        if chosen is None:
            return ToolReport()
        where = "name IN ({names}) AND ts >= ? AND ts < ?" + chosen[0]
        params = (start_ms, end_ms, *chosen[1])
        claudes = {name: event_names({name: CLAUDE_CODE}, agent) for name in ("tool_decision", "api_retries_exhausted")}
        conn = self._reader()
        tools = conn.execute(f"""
            WITH calls AS (SELECT {TOOL_NAME} AS tool,
                                  CAST(COALESCE(json_extract(attributes, '$.duration_ms'), 0) AS INTEGER) AS ms,
                                  {FAILED_TOOL} AS failed FROM events
                           WHERE {where.format(names=event_names(TOOL_CALL_EVENTS, agent))}),
                 ranked AS (SELECT tool, ms, failed, ROW_NUMBER() OVER (PARTITION BY tool ORDER BY ms) AS rank,
                                   COUNT(*) OVER (PARTITION BY tool) AS n FROM calls)
            SELECT tool, n, n - SUM(failed),
                   MAX(CASE WHEN rank = (n * 50 + 99) / 100 THEN ms END),
                   MAX(CASE WHEN rank = (n * 95 + 99) / 100 THEN ms END)
            FROM ranked GROUP BY tool ORDER BY n DESC, tool""", params).fetchall()
        decisions = conn.execute(  # Claude Code's decisions: the others' are no event of their own
            f"SELECT COALESCE(json_extract(attributes, '$.decision'), '?'), COALESCE(json_extract(attributes, "
            f"'$.source'), '?'), COUNT(*) FROM events WHERE {where.format(names=claudes['tool_decision'])} "
            "GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2", params).fetchall()
        errors = conn.execute(
            f"SELECT CAST(COALESCE(json_extract(attributes, '$.status_code'), '?') AS TEXT), "
            f"COALESCE(json_extract(attributes, '$.model'), '?'), COUNT(*) FROM events "
            f"WHERE {where.format(names=event_names(API_ERROR_EVENTS, agent))} GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2",
            params).fetchall()
        exhausted = conn.execute(f"SELECT COUNT(*) FROM events WHERE "
                                 f"{where.format(names=claudes['api_retries_exhausted'])}", params).fetchone()[0]
        return ToolReport(tuple(ToolFigures(str(tool), calls, ok, p50 or 0, p95 or 0)
                                for tool, calls, ok, p50, p95 in tools),
                          tuple(DecisionCount(str(decision), str(source), n) for decision, source, n in decisions),
                          tuple(ApiErrorCount(str(code), str(model), n) for code, model, n in errors), exhausted)

    def blocks(self, start_ms: int, end_ms: int, user: str | None = None,
               project: str | None = None) -> list[UsageBlock]:
        """Automatic 5-hour blocks overlapping [start_ms, end_ms): each starts at the first activity after the
        previous one ended, floored to the hour. Activity is read at quarter-hour resolution from the rollup,
        which the hour floor makes exact; the chain is followed from the last pause of 5 hours before the
        period (looking back up to 30 days). With a project: the user's blocks still (Claude's windows are the
        account's), with the project's figures in them; blocks it had no usage in are left out."""
        chosen = self._user_filter(user)
        if chosen is None:
            return []
        where, params = chosen[0] + f" AND {CLAUDES_MODELS}", chosen[1]  # Claude's windows: Claude Code's usage
        chain_start = self._chain_start(start_ms, where, params)
        windows = self.claude_windows(user, chain_start, end_ms)
        rows = self._reader().execute(
            f"SELECT bucket, model, {USAGE_SUMS} FROM usage_rollup WHERE bucket >= ? AND bucket < ?{where} "
            "GROUP BY bucket, model ORDER BY bucket", (chain_start, end_ms, *params))
        names = self._names("models")
        blocks: list[BlockTally] = []
        for bucket, model, *figures in rows:
            if not blocks or bucket + BUCKET_MS > blocks[-1].end_ms:
                for moment in self._activity(bucket, windows, blocks[-1].end_ms if blocks else 0, where, params):
                    if not blocks or moment >= blocks[-1].end_ms:
                        begin, end, from_claude = block_around(moment, blocks[-1].end_ms if blocks else 0, windows)
                        blocks.append(BlockTally(begin, end, {}, bucket, from_claude))
            if not blocks:
                continue
            block = blocks[-1]
            block.by_model[names[model]] = block.by_model.get(names[model], Usage()) + Usage(*figures)
            block.last_activity_ms = bucket
        others = self.other_models()
        for block in blocks:  # Claude's edges fall inside quarter hours: such a block is summed exactly
            if block.start_ms % BUCKET_MS or block.end_ms % BUCKET_MS:
                block.by_model = {model: usage for model, usage in self.usage(block.start_ms, block.end_ms,
                                                                              user=user).items() if model not in others}
        blocks = [block for block in blocks if block.end_ms > start_ms]
        if project is None or not blocks:
            return [block.block() for block in blocks]
        where, params = self._filter(user, project)
        where += f" AND {CLAUDES_MODELS}"
        shares = [BlockTally(block.start_ms, block.end_ms, {}, block.start_ms, block.from_claude) for block in blocks]
        starts = [block.start_ms for block in shares]
        for bucket, model, *figures in self._reader().execute(
                f"SELECT ts - ts % {BUCKET_MS}, model, {RAW_SUMS} FROM requests WHERE ts >= ? AND ts < ?{where} "
                "GROUP BY 1, 2 ORDER BY 1", (starts[0], end_ms, *params)):
            share = shares[bisect.bisect_right(starts, bucket) - 1]  # every bucket of the user's is in a block
            share.by_model[names[model]] = share.by_model.get(names[model], Usage()) + Usage(*figures)
            share.last_activity_ms = max(share.last_activity_ms, bucket)
        return [share.block() for share in shares if share.by_model]

    def _activity(self, bucket: int, windows: list[tuple[int, int]], block_end: int, where: str,
                  params: tuple) -> list[int]:
        """When activity in a quarter hour begins: the quarter hour itself, unless a window's or the running
        block's edge falls inside it; then the first request of each part (from the raw rows) that has one."""
        edges = sorted({edge for window in windows for edge in window if bucket < edge < bucket + BUCKET_MS} |
                       ({block_end} if bucket < block_end < bucket + BUCKET_MS else set()))
        if not edges:
            return [bucket]
        moments = []
        for lo, hi in zip([bucket, *edges], [*edges, bucket + BUCKET_MS]):
            first = self._reader().execute(f"SELECT MIN(ts) FROM requests WHERE ts >= ? AND ts < ?{where}",
                                           (lo, hi, *params)).fetchone()[0]
            if first is not None:
                moments.append(first)
        return moments

    def _chain_start(self, before_ms: int, where: str, params: tuple) -> int:
        """Where block chaining must start to be exact for blocks from `before_ms` on: after a pause of 5 hours
        or more no block can still be running, so the next activity starts a block of its own."""
        later = before_ms
        for bucket, in self._reader().execute(
                f"SELECT DISTINCT bucket FROM usage_rollup WHERE bucket >= ? AND bucket < ?{where} "
                "ORDER BY bucket DESC", (before_ms - LEARN_FROM_MS, before_ms, *params)):
            if later - bucket >= BLOCK_MS + BUCKET_MS:  # a pause: `later` begins a block (buckets are 15 min)
                return later
            later = bucket
        return later

    def users(self, start_ms: int, end_ms: int, project: str | None = None,
              agent: str | None = None) -> list[UserUsage]:
        """Each user's usage in the period (in one project's sessions, of one agent), highest cost first, with how
        many sessions they had then and Claude's live windows of theirs at its end."""
        by_user: dict[str, dict[str, Usage]] = {}
        for (user, model), usage in self.usage(start_ms, end_ms, by="user, model", project=project,
                                               agent=agent).items():
            by_user.setdefault(user, {})[model] = usage
        others = self.other_models()
        splits = {user: Split.from_models(models, others) for user, models in by_user.items()}
        sessions = self.user_sessions(start_ms, end_ms, project, agent)
        live = {agent: self.live_limits(end_ms, agent) for agent in AGENTS}
        ranked = sorted(splits, key=lambda user: (-splits[user].total.cost_nanos, user))
        return [UserUsage(user, splits[user], sessions.get(user, 0),
                          *(live[CLAUDE_CODE].get(user, ClaudeLimits()).window(name, end_ms)
                            for name in ("five_hour", "seven_day")),
                          tuple(agent_windows(agent, user, live[agent][user], end_ms)
                                for agent in AGENTS[1:] if user in live[agent]))
                for user in ranked]

    def user_sessions(self, start_ms: int, end_ms: int, project: str | None = None,
                      agent: str | None = None) -> dict[str, int]:
        """How many sessions each user had active in the period (in one project's sessions, of one agent)."""
        where, params = self._filter(None, project, session_column="su.session", agent=agent, model_column="su.model")
        return dict(self._reader().execute(
            "SELECT u.name, COUNT(DISTINCT su.session) FROM session_usage su JOIN users u ON u.id = su.user "
            f"WHERE su.last_ts >= ? AND su.first_ts < ?{where} GROUP BY u.name", (start_ms, end_ms, *params)))

    def projects(self, start_ms: int, end_ms: int, user: str | None = None, project: str | None = None,
                 agent: str | None = None) -> list[ProjectUsage]:
        """Per project ('' for the sessions without one), highest cost first: its usage in [start_ms, end_ms) and
        how many sessions had usage then. A session's totals per model come from session_usage when they lie wholly
        inside the period; raw rows are read only for those crossing its edges. (With a user, a session's totals
        are its user's as session_usage names them: the user of its latest row.)"""
        inside_filter = self._filter(user, project, "su.user", "su.session", agent, "su.model")
        crossing_filter = self._filter(user, project, "r.user", "su.session", agent, "su.model")  # each row's user
        if inside_filter is None or crossing_filter is None or start_ms >= end_ms:
            return []
        (inside, inside_params), (crossing, crossing_params) = inside_filter, crossing_filter
        figures = list(FIGURES)[1:]
        raw = ", ".join(f"SUM({expression.format(r='r.')})" for expression in list(FIGURES.values())[1:])
        rows = self._reader().execute(
            f"WITH parts (session, model, {', '.join(figures)}) AS ("
            f"SELECT su.session, su.model, {', '.join('su.' + column for column in figures)} FROM session_usage su "
            f"WHERE su.last_ts >= ? AND su.last_ts < ? AND su.first_ts >= ?{inside} "
            # The sessions crossing an edge: among those ending after the start (by session_usage_last, not a scan of
            # every session in key order, which SQLite prefers to save a sort), then each one's rows (CROSS JOIN: su
            # first, then r by requests_session, never all of requests by time).
            f"UNION ALL SELECT su.session, su.model, {raw} FROM session_usage su INDEXED BY session_usage_last "
            "CROSS JOIN requests r ON r.session = su.session AND r.model = su.model AND r.ts >= ? AND r.ts < ? "
            f"WHERE su.last_ts >= ? AND su.first_ts < ? AND (su.first_ts < ? OR su.last_ts >= ?){crossing} "
            "GROUP BY su.session, su.model), "
            "named AS (SELECT COALESCE(s.project, '') AS project, parts.* FROM parts JOIN sessions s ON s.id = "
            f"parts.session) SELECT project, model, {', '.join(f'SUM({column})' for column in figures)} FROM named "
            f"GROUP BY project, model UNION ALL SELECT project, NULL, COUNT(DISTINCT session)"
            f"{', 0' * (len(figures) - 1)} FROM named GROUP BY project",
            (start_ms, end_ms, start_ms, *inside_params, start_ms, end_ms, start_ms, end_ms, start_ms, end_ms,
             *crossing_params))
        names = self._names("models")
        found: dict[str, tuple[dict[str, Usage], int]] = {}
        for name, model, *sums in rows:  # a project's models, then its sessions (model NULL)
            by_model, sessions = found.get(name, ({}, 0))
            if model is None:
                sessions = sums[0]
            else:
                by_model[names[model]] = Usage(*sums)
            found[name] = (by_model, sessions)
        others = self.other_models()
        splits = {name: Split.from_models(by_model, others) for name, (by_model, _) in found.items()}
        ranked = sorted(splits, key=lambda name: (-splits[name].total.cost_nanos, name))
        return [ProjectUsage(name, splits[name], found[name][1]) for name in ranked]

    def last_request_ms(self) -> int | None:
        return self._reader().execute("SELECT MAX(ts) FROM requests").fetchone()[0]

    def receiver_counts(self) -> list[ReceiverCounts]:
        return [ReceiverCounts(*row) for row in self._reader().execute(
            "SELECT protocol, signal, last_ms, accepted, rejected FROM receiver_counts ORDER BY protocol, signal")]

    def counter_series(self, labels: dict[str, int], most_series: int) -> list[CounterSeries]:
        """Every counter series (see CounterSeries), the stored usage per session and model (session_usage) plus
        retired_usage, summed in SQL. Only the first labels[kind] users, models and projects by id, and the first
        most_series series by id (ids follow the order things were first seen in, which never changes) are named;
        the others are summed as None: all three names None for a series past most_series. Each is summed per agent
        (its model's, named past the caps too), so that the usage past them still tells agents apart."""
        columns = ", ".join(SERIES_FIGURES)
        sums = ", ".join(f"SUM({c})" for c in SERIES_FIGURES)
        # Summed per series first (a few hundred rows), then named: a name is looked up once per series, not per
        # session.
        rows = self._reader().execute(
            f"WITH t (user, model, project, {columns}) AS ({STORED_SERIES.format(where='')} "
            f"UNION ALL SELECT user, model, project, {columns} FROM retired_usage), "
            f"series (user, model, project, {columns}) AS (SELECT user, model, project, {sums} FROM t GROUP BY 1, 2, 3) "
            "SELECT a.name, CASE WHEN named AND t.user IN (SELECT id FROM users ORDER BY id LIMIT ?) THEN u.name END, "
            "CASE WHEN named AND t.model IN (SELECT id FROM models ORDER BY id LIMIT ?) THEN m.name END, "
            "CASE WHEN NOT named THEN NULL WHEN t.project = 0 THEN '' "
            "WHEN t.project IN (SELECT id FROM projects ORDER BY id LIMIT ?) "
            f"THEN p.name END, {', '.join(f'SUM(t.{c})' for c in SERIES_FIGURES)} FROM (SELECT series.*, "
            "COALESCE(ms.id <= ?, 0) AS named FROM series LEFT JOIN metric_series ms ON ms.user = series.user "
            "AND ms.model = series.model AND ms.project = series.project) t "
            "JOIN users u ON u.id = t.user JOIN models m ON m.id = t.model JOIN agents a ON a.id = m.agent "
            "LEFT JOIN projects p ON p.id = t.project GROUP BY 1, 2, 3, 4",
            (labels["user"], labels["model"], labels["project"], most_series)).fetchall()
        return [CounterSeries(user, model, project, Usage(*sums), agent) for agent, user, model, project, *sums in rows]

    def first_models(self, most: int) -> list[tuple[str, str]]:
        """The first `most` models by id (those the Prometheus metrics name), each with its agent's name."""
        return self._reader().execute("SELECT m.name, a.name FROM models m JOIN agents a ON a.id = m.agent "
                                      "ORDER BY m.id LIMIT ?", (most,)).fetchall()

    def first_users(self, most: int) -> list[str]:
        """The names of the first `most` users by id (those the Prometheus metrics name)."""
        return [name for name, in self._reader().execute("SELECT name FROM users ORDER BY id LIMIT ?", (most,))]

    def totals(self) -> StoreTotals:
        """API requests and all usage rows (those derived from metrics too) ever stored."""
        return StoreTotals(*self._reader().execute("SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(rows), 0) "
                                                   "FROM usage_daily").fetchone())


# ---------------------------------------------------------------- OTLP ingestion: decode records, validate values

EVENT_PREFIX = "claude_code."
KNOWN_EVENTS = {"api_request", "user_prompt", "assistant_response", "tool_result", "tool_decision",
                "api_error", "api_retries_exhausted", "compaction", "plugin_loaded"}
# Attributes that describe who/where rather than what: stored once per distinct combination.
IDENTITY_KEYS = ("user.id", "user.email", "user.account_uuid", "organization.id", "terminal.type")
REQUEST_COLUMNS_KEYS = {"event.name", "event.timestamp", "event.sequence", "session.id", "model",
                        "input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens",
                        "cost_usd", "cost_usd_micros", "duration_ms", "ttft_ms", "prompt.id", "request_id"}
REQUEST_EXTRA_LEFT_OUT = REQUEST_COLUMNS_KEYS | set(IDENTITY_KEYS)  # what a request row's extra attributes are not
EVENT_COLUMNS_KEYS = {"event.name", "event.timestamp", "session.id", "prompt.id"}
# An export with more records (or data points) is refused whole, before it is parsed: parsing materialises
# every record, and 16 MiB of empty ones (2 bytes each) took a decoder to 1.15 GB. The SDKs send 512 at a time.
MAX_RECORDS_PER_EXPORT = 100_000
WRITE_CHUNK_ROWS = 5_000  # rows decoded and stored at a time: a big export never holds all its rows at once
# Caps per record: what is over them is rejected (partial_success), never stored or crashed on.
MAX_ATTRIBUTES = 1024
MAX_VALUE_CHARS = 1024 * 1024
MAX_DEPTH = 8
SCALAR_KINDS = ("string_value", "int_value", "double_value", "bool_value")
# Attributes ccmon reads as text (ids and names): a number or a boolean is taken as its text, but an array, a
# key-value list or bytes names nothing, and its record is rejected. "type" is read on metric data points.
TEXT_KEYS = (*IDENTITY_KEYS, "session.id", "conversation.id", "model", "prompt.id", "prompt_id", "request_id",
             "response_id")
POINT_TEXT_KEYS = (*TEXT_KEYS, "type", "token_type")
NOT_TEXT = {list: "an array", dict: "a key-value list", bytes: "bytes"}
# Clocks drift a little; a record dated further ahead than this is stored at the time it was received (a fast
# clock would otherwise make its session the most recent one for ever), its own time kept under ORIGINAL_TIME_KEY.
FUTURE_TOLERANCE_MS = 5 * 60_000
ORIGINAL_TIME_KEY = "ccmon.original_timestamp"


def any_value(value, depth: int = 0) -> Any:
    """An OTLP AnyValue as a plain Python value (bytes stay bytes); raises BadValue past the caps."""
    if depth > MAX_DEPTH:
        raise BadValue(f"attribute values nested deeper than {MAX_DEPTH} levels")
    kind = value.WhichOneof("value")
    if kind == "array_value":
        if len(value.array_value.values) > MAX_ATTRIBUTES:
            raise BadValue(f"an array attribute has more than {MAX_ATTRIBUTES} values")
        return [any_value(v, depth + 1) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_dict(value.kvlist_value.values, depth + 1)
    if kind is None:
        return None
    scalar = getattr(value, kind)
    if kind in ("string_value", "bytes_value") and len(scalar) > MAX_VALUE_CHARS:
        raise BadValue(f"an attribute value is longer than {MAX_VALUE_CHARS // 1024} KiB")
    return scalar


def attributes_dict(key_values, depth: int = 0) -> dict[str, Any]:
    if len(key_values) > MAX_ATTRIBUTES:
        raise BadValue(f"more than {MAX_ATTRIBUTES} attributes")
    attributes = {}
    for kv in key_values:  # the hot loop of ingestion: plain scalars without a call per value
        value = kv.value
        text = value.string_value  # most values are text: a non-empty one is the value's kind, asked no further
        if text and len(text) <= MAX_VALUE_CHARS:
            attributes[kv.key] = text
            continue
        kind = value.WhichOneof("value")
        if kind in SCALAR_KINDS and (kind != "string_value" or len(text) <= MAX_VALUE_CHARS):
            attributes[kv.key] = getattr(value, kind)
        else:
            attributes[kv.key] = any_value(value, depth)
    return attributes


def check_text(attrs: dict, keys: tuple[str, ...]) -> None:
    """BadValue for the first of `keys` whose value is not text (see TEXT_KEYS)."""
    for key in keys:
        kind = NOT_TEXT.get(type(attrs.get(key)))
        if kind:
            raise BadValue(f"{key} is {kind}, not text")


def record_time_ms(attrs: dict, record) -> int | None:
    """event.timestamp, else the record's time, else its observed time; None when it has none of them."""
    for ms in (parse_iso_ms(attrs.get("event.timestamp")), record.time_unix_nano // 1_000_000,
               record.observed_time_unix_nano // 1_000_000):
        if ms and ms <= MAX_TIMESTAMP_MS:
            return ms
    return None


def unless_ahead(ms: int, received_ms: int) -> tuple[int, str | None]:
    """(the time to store, the original as ISO 8601 when that is the time received instead): see
    FUTURE_TOLERANCE_MS."""
    if ms <= received_ms + FUTURE_TOLERANCE_MS:
        return ms, None
    return received_ms, iso_from_ms(ms)


def event_name(attrs: dict, record) -> str:
    """claude_code.<name> from the body, else event.name, else the record's event_name, else 'log'."""
    body = record.body.string_value if record.body.WhichOneof("value") == "string_value" else ""
    if body.startswith(EVENT_PREFIX) and len(body) <= 100:
        return body.removeprefix(EVENT_PREFIX)
    for candidate in (attrs.get("event.name"), record.event_name):
        if isinstance(candidate, str) and candidate and len(candidate) <= 100:
            return candidate.removeprefix(EVENT_PREFIX)
    return "log"


def record_key(attrs: dict, record, undated: bool) -> tuple[str, int]:
    """The de-duplication key besides the timestamp: (session.id, event.sequence), or a negative hash
    of the whole record where Claude Code's sequence number is missing or the record has no time (see
    UNDATED_SEQ)."""
    session, sequence = session_id_of(attrs), attrs.get("event.sequence")
    if undated:
        return session, content_hash(record.SerializeToString(deterministic=True), UNDATED_SEQ)
    if type(sequence) is int and 0 <= sequence < 2 ** 62:
        return session, sequence
    if isinstance(sequence, str) and sequence.isdigit() and len(sequence) < 18:
        return session, int(sequence)
    return session, content_hash(record.SerializeToString(deterministic=True))


def session_id_of(attrs: dict) -> str:
    """session.id (Codex: conversation.id) as text: '' when absent or unset (an AnyValue of no kind), never 'None'."""
    session = attrs.get("session.id", attrs.get("conversation.id"))
    return "" if session is None else str(session)


def content_hash(data: bytes, top: int = -1) -> int:
    """A hash of `data` from `top` down, in a range of 2**62."""
    return top - (int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") >> 2)


def json_default(value: Any) -> str:
    return value.hex() if isinstance(value, bytes) else str(value)


# One encoder for every record: json.dumps with options makes a new one at each call.
COMPACT_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=json_default, allow_nan=False)


def compact_json(mapping: dict) -> str | None:
    if not mapping:
        return None
    try:
        return COMPACT_JSON.encode(mapping)
    except ValueError:  # a NaN or an infinity: JSON has none, and SQLite's json functions fail on the whole table
        return COMPACT_JSON.encode(finite_json(mapping))


def finite_json(value: Any) -> Any:
    """`value` with each NaN or infinity as its text ('nan', 'inf', '-inf')."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    return value


def optional_text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def resource_project(resource: dict) -> str:
    """The project OTEL_RESOURCE_ATTRIBUTES=project=NAME names ('' for none): it wins over a status line's folder."""
    project = resource.get("project")
    return project.strip() if isinstance(project, str) else ""


class Sources:
    """Canonical JSON of resource + identity attributes, memoized: every record of a session has the same."""

    def __init__(self):
        self._memo: dict[tuple, str | None] = {}

    def json(self, resource_json: str, attrs: dict) -> str | None:
        identity = tuple(attrs.get(k) for k in IDENTITY_KEYS)
        key = (resource_json, identity)
        if key not in self._memo:
            if len(self._memo) > 10_000:
                self._memo.clear()
            merged = {**json.loads(resource_json), **{k: v for k, v in zip(IDENTITY_KEYS, identity) if v is not None}}
            self._memo[key] = compact_json(merged)
        return self._memo[key]


def check_call_tokens(counts: Iterable[int], keys: Iterable[str] = TOKEN_KEYS) -> None:
    """BadValue for a count of a kind more than one API call can use."""
    for key, count in zip(keys, counts):
        if count > MAX_REQUEST_TOKENS:
            raise BadValue(f"{key}={count} is more than one API call can use ({MAX_REQUEST_TOKENS:,} tokens of a kind)")


def call_times(attrs: dict) -> tuple[int, int | None]:
    """A call's duration_ms and ttft_ms (None when not reported); BadValue for unreadable or impossible ones."""
    duration = parse_count(attrs.get("duration_ms", 0), "duration_ms")
    ttft = parse_count(attrs["ttft_ms"], "ttft_ms") if attrs.get("ttft_ms") not in (None, "") else None
    for key, ms in (("duration_ms", duration), ("ttft_ms", ttft or 0)):
        if ms > MAX_REQUEST_MS:
            raise BadValue(f"{key}={ms} is longer than one API call can take (a day)")
    return duration, ttft


def request_row(attrs: dict, ts: int, source: str | None, user: str, record, undated: bool) -> tuple:
    """One api_request record as a `requests` row (REQUEST_COLUMNS); raises BadValue for unreadable figures."""
    counts = [parse_count(attrs.get(key, 0), key) for key in TOKEN_KEYS]
    check_call_tokens(counts)
    cost_key = "cost_usd" if "cost_usd" in attrs else "cost_usd_micros"
    if cost_key == "cost_usd":
        cost = parse_usd_nanos(attrs["cost_usd"], "cost_usd")
    else:
        cost = parse_usd_nanos(exact_number(attrs.get("cost_usd_micros", 0), "cost_usd_micros") / 10 ** 6
                               if attrs.get("cost_usd_micros") else 0, "cost_usd_micros")
    if cost > MAX_REQUEST_USD * NANOS_PER_USD:
        raise BadValue(f"{cost_key}={attrs[cost_key]!r} is more than one API call can cost (${MAX_REQUEST_USD:,})")
    duration, ttft = call_times(attrs)
    extra = {k: v for k, v in attrs.items() if k not in REQUEST_EXTRA_LEFT_OUT}
    session, seq = record_key(attrs, record, undated)
    return (ts, session, seq, optional_text(attrs.get("model")) or "unknown", user, *counts,
            cost, duration, ttft, optional_text(attrs.get("prompt.id")), optional_text(attrs.get("request_id")),
            source, compact_json(extra), ORIGIN_EVENT, CLAUDE_CODE)


def counts_of(attrs: dict, *keys: str) -> list[int]:
    return [parse_count(attrs.get(key, 0), key) for key in keys]


def uncached(prompt: int, cached: int, keys: str) -> int:
    """The input tokens not read from (or written to) a cache, of a prompt count that includes them."""
    if cached > prompt:
        raise BadValue(f"{keys} ({cached}) is more than the input it is part of ({prompt})")
    return prompt - cached


def gemini_tokens(attrs: dict) -> tuple[int, int, int, int]:
    """Gemini CLI's input counts the cached tokens and leaves out the tool-use prompt; its output leaves out the
    thoughts, billed as output."""
    prompt, cached, output, thoughts, tool = counts_of(attrs, *GEMINI_TOKEN_KEYS)
    return uncached(prompt, cached, "cached_content_token_count") + tool, output + thoughts, cached, 0


def codex_tokens(attrs: dict) -> tuple[int, int, int, int]:
    """Codex's input counts the cached tokens (and those written to a cache); its output, the reasoning."""
    prompt, cached, written, output = counts_of(attrs, *CODEX_TOKEN_KEYS)
    return uncached(prompt, cached + written, "cached_token_count + cache_write_token_count"), output, cached, written


def qwen_tokens(attrs: dict) -> tuple[int, int, int, int]:
    """Qwen Code's input counts the cached tokens; its output, the thoughts (reported apart too)."""
    prompt, cached, output = counts_of(attrs, *QWEN_TOKEN_KEYS)
    return uncached(prompt, cached, "cached_content_token_count"), output, cached, 0


GEMINI_TOKEN_KEYS = ("input_token_count", "cached_content_token_count", "output_token_count", "thoughts_token_count",
                     "tool_token_count")
CODEX_TOKEN_KEYS = ("input_token_count", "cached_token_count", "cache_write_token_count", "output_token_count")
QWEN_TOKEN_KEYS = ("input_token_count", "cached_content_token_count", "output_token_count")


@dataclasses.dataclass(frozen=True)
class AgentCall:
    """How another agent's log event of one model call reads: its agent, its figures in ccmon's kinds (input
    without cache, output, cache read, cache write) and the attributes the token columns stand for, left out of
    the row's attributes. A figure summed into a column with another (Gemini's thoughts and tool-use prompt) is not
    one of them: it stays, the only record of how that column's figure is made up."""
    agent: str
    tokens: Callable[[dict], tuple[int, int, int, int]]
    column_keys: tuple[str, ...]


# The other agents' model-call events, by event.name; one carrying no input_token_count is no call (Codex logs
# each response.completed twice, once with the usage).
AGENT_CALLS = {"gemini_cli.api_response": AgentCall(GEMINI_CLI, gemini_tokens, GEMINI_TOKEN_KEYS[:3]),
               "codex.sse_event": AgentCall(CODEX, codex_tokens, CODEX_TOKEN_KEYS),
               "qwen-code.api_response": AgentCall(QWEN_CODE, qwen_tokens, QWEN_TOKEN_KEYS)}
AGENT_CALL_KEYS = {"event.name", "event.timestamp", "session.id", "conversation.id", "model", "duration_ms",
                   "ttft_ms", "prompt_id", "response_id"}  # also stored in columns


CODEX_TURN_COST = "codex.turn_cost"  # Codex's own cost of a turn, once its backend priced it


def turn_cost(attrs: dict) -> tuple[str, str, int]:
    """A codex.turn_cost event as (conversation, turn id, nano-dollars); BadValue when it names no turn or its
    cost is unreadable."""
    session, turn = session_id_of(attrs), optional_text(attrs.get("turn.id"))
    if not session or not turn:
        raise BadValue("a turn cost needs its conversation.id and turn.id")
    cost = parse_usd_nanos(attrs.get("usage.estimated_usd"), "usage.estimated_usd")
    if cost > MAX_REQUEST_USD * NANOS_PER_USD:
        raise BadValue(f"usage.estimated_usd={attrs['usage.estimated_usd']!r} is more than a turn can cost")
    return session, turn, cost


def agent_call_row(call: AgentCall, attrs: dict, ts: int, source: str | None, user: str, record, undated: bool,
                   prices: dict[str, Price] | None) -> tuple:
    """Another agent's model-call event as a `requests` row (REQUEST_COLUMNS), priced by ccmon (estimated); raises
    BadValue for unreadable figures. Its other figures (reasoning, totals) stay in its attributes."""
    counts = call.tokens(attrs)
    check_call_tokens(counts)
    model = optional_text(attrs.get("model")) or "unknown"
    duration, ttft = call_times(attrs)
    extra = {k: v for k, v in attrs.items()
             if k not in AGENT_CALL_KEYS and k not in call.column_keys and k not in IDENTITY_KEYS}
    session, seq = record_key(attrs, record, undated)
    return (ts, session, seq, model, user, *counts, estimated_cost(model, *counts, prices), duration, ttft,
            optional_text(attrs.get("prompt_id")), optional_text(attrs.get("response_id")), source,
            compact_json(extra), ORIGIN_EVENT_ESTIMATED, call.agent)


def event_row(name: str, attrs: dict, ts: int, source: str | None, user: str, record, undated: bool) -> tuple:
    """One other event as an `events` row (EVENT_COLUMNS)."""
    rest = {k: v for k, v in attrs.items() if k not in EVENT_COLUMNS_KEYS and k not in IDENTITY_KEYS}
    body = any_value(record.body)
    if body is not None and body != EVENT_PREFIX + name:
        rest["body"] = body
    session, seq = record_key(attrs, record, undated)
    return (ts, session, seq, user, name, optional_text(attrs.get("prompt.id", attrs.get("prompt_id"))), source,
            compact_json(rest) or "{}")


class Rejections:
    """Counts an export's records and the rejected ones, keeping the first few reasons, for the partial_success
    message; counts there too the records stored at the time received because they were dated ahead (stored, so
    not rejected)."""

    def __init__(self, what: str):
        self.what, self.total, self.count, self.reasons, self.dated_ahead = what, 0, 0, [], 0
        self.failures = 0  # records ccmon failed on (its own bug): logged with a traceback once per export

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.reasons) < 3:
            self.reasons.append(reason)

    def message(self) -> str:
        total, parts = self.total, []
        if self.count:
            more = f"; and {self.count - len(self.reasons)} more" if self.count > len(self.reasons) else ""
            parts.append(f"rejected {self.count} of {total} {self.what}: {'; '.join(self.reasons)}{more}")
        if self.dated_ahead:
            parts.append(f"{self.dated_ahead} of {total} {self.what} were dated more than "
                         f"{FUTURE_TOLERANCE_MS // 60_000} minutes ahead of the server's clock: stored at the time "
                         f"received, their own time kept as {ORIGINAL_TIME_KEY}")
        return "; ".join(parts)

    def answer(self, response, count_field: str):
        """The Export response, with partial_success (and a log line) when anything was rejected or re-dated."""
        if self.count or self.dated_ahead:
            log.warning("%s", self.message())
            setattr(response.partial_success, count_field, self.count)
            response.partial_success.error_message = self.message()
        return response


class LogsIngest:
    """Decodes ExportLogsServiceRequest into rows."""

    def __init__(self, prices: dict[str, Price] | None = None):
        self._seen_unknown: set[str] = set()
        self.sources = Sources()
        self.prices = prices  # [pricing]: the other agents' calls are priced by ccmon

    def decode(self, request, rejected: Rejections) -> Iterator[Batch]:
        """The request's rows, WRITE_CHUNK_ROWS at a time; what is rejected or re-dated is counted in `rejected`."""
        batch, received = Batch(), now_ms()
        for resource_logs in request.resource_logs:
            try:
                resource = attributes_dict(resource_logs.resource.attributes)
                check_text(resource, USER_KEYS)
            except BadValue as exc:
                resource, resource_problem = {}, f"resource: {exc}"
            else:
                resource_problem = ""
            resource_json = compact_json(resource) or "{}"
            for scope_logs in resource_logs.scope_logs:
                for record in scope_logs.log_records:
                    rejected.total += 1
                    if resource_problem:
                        rejected.add(resource_problem)
                        continue
                    try:
                        self._decode_record(record, resource, resource_json, received, batch, rejected)
                    except Exception as exc:  # a bug of ccmon's costs the record it met, never the export
                        if not rejected.failures:
                            log.exception("decoding a log record failed")
                        rejected.failures += 1
                        rejected.add(f"log record: ccmon failed to decode it ({type(exc).__name__}: {exc})"[:300])
                    if len(batch) == WRITE_CHUNK_ROWS:
                        yield batch
                        batch = Batch()
        if len(batch):
            yield batch

    def _decode_record(self, record, resource: dict, resource_json: str, received: int, batch: Batch,
                       rejected: Rejections) -> None:
        try:
            attrs = attributes_dict(record.attributes)
            check_text(attrs, TEXT_KEYS)
            name = event_name(attrs, record)
        except BadValue as exc:
            rejected.add(f"log record: {exc}")
            return
        source = self.sources.json(resource_json, attrs)
        user = user_name(attrs, resource)
        project, session = resource_project(resource), session_id_of(attrs)
        if project and session:
            batch.projects[session] = project
        ms = record_time_ms(attrs, record)
        ts, original = unless_ahead(received if ms is None else ms, received)
        if original:
            attrs[ORIGINAL_TIME_KEY] = original
        try:
            call = AGENT_CALLS.get(name)
            if name == CODEX_TURN_COST:
                batch.turn_costs.append(turn_cost(attrs))
            if name == "api_request":
                batch.requests.append(request_row(attrs, ts, source, user, record, ms is None))
            elif call and "input_token_count" in attrs:
                batch.requests.append(agent_call_row(call, attrs, ts, source, user, record, ms is None, self.prices))
            else:
                batch.events.append(event_row(name, attrs, ts, source, user, record, ms is None))
        except BadValue as exc:
            rejected.add(f"{name} in session {session or '?'}: {exc}")
            return
        rejected.dated_ahead += bool(original)
        known = name in KNOWN_EVENTS or call
        if not known and name not in self._seen_unknown and len(self._seen_unknown) < 1000:
            self._seen_unknown.add(name)
            log.info("storing events of a kind ccmon does not know yet: %r", name)


def metric_rows(request, rejected: Rejections, sources: Sources, projects: dict[str, str]) -> Iterator[list[tuple]]:
    """Number data points (sums and gauges; histograms by their sum) as metric_points rows (METRIC_COLUMNS),
    WRITE_CHUNK_ROWS at a time; what is rejected or re-dated is counted in `rejected`, and the sessions' projects
    their resources name go into `projects`."""
    rows, received = [], now_ms()
    for resource_metrics in request.resource_metrics:
        try:
            resource = attributes_dict(resource_metrics.resource.attributes)
            check_text(resource, USER_KEYS)
        except BadValue as exc:
            count = sum(len(getattr(m, m.WhichOneof("data")).data_points)
                        for sm in resource_metrics.scope_metrics for m in sm.metrics if m.WhichOneof("data"))
            for _ in range(count):
                rejected.add(f"resource: {exc}")
            rejected.total += count
            continue
        resource_json = compact_json(resource) or "{}"
        project = resource_project(resource)
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                kind = metric.WhichOneof("data")
                if kind is None:
                    continue
                data = getattr(metric, kind)
                temporality = getattr(data, "aggregation_temporality", 0)
                for point in data.data_points:
                    rejected.total += 1
                    if kind in ("sum", "gauge"):
                        value = point.as_double if point.WhichOneof("value") == "as_double" else point.as_int
                    else:
                        value = point.sum
                    if not math.isfinite(value) or value < 0 or value >= MAX_COUNT:
                        rejected.add(f"{metric.name}: value {value!r} is not a number from 0 to {MAX_COUNT:.0e}")
                        continue
                    try:
                        attrs = attributes_dict(point.attributes)
                        check_text(attrs, POINT_TEXT_KEYS)
                    except BadValue as exc:
                        rejected.add(f"{metric.name}: {exc}")
                        continue
                    identity = json.dumps([metric.name, attrs, point.start_time_unix_nano, value],
                                          sort_keys=True, default=json_default)
                    point_type = attrs.get("type", attrs.get("token_type"))  # Codex: token_type
                    rest = {k: v for k, v in attrs.items()
                            if k not in ("session.id", "model", "type") and k not in IDENTITY_KEYS}
                    point_ms = point.time_unix_nano // 1_000_000
                    undated = not 0 < point_ms <= MAX_TIMESTAMP_MS
                    ts, original = unless_ahead(received if undated else point_ms, received)
                    if original:
                        rest[ORIGINAL_TIME_KEY] = original
                        rejected.dated_ahead += 1
                    session = session_id_of(attrs)
                    if project and session:
                        projects[session] = project
                    rows.append((ts, point.start_time_unix_nano // 1_000_000 or None,
                                 session, content_hash(identity.encode(), UNDATED_SEQ if undated else -1),
                                 user_name(attrs, resource), metric.name, temporality, float(value),
                                 optional_text(attrs.get("model")), optional_text(point_type),
                                 sources.json(resource_json, attrs), compact_json(rest) or "{}"))
                    if len(rows) == WRITE_CHUNK_ROWS:
                        yield rows
                        rows = []
    if rows:
        yield rows


M_MMAP_THRESHOLD = -3            # mallopt's parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1024 ** 2  # blocks this big get pages of their own, which go back to the system when freed
TRIM_DELAY_S = 1.0                # an export's request is freed once its answer is sent: give memory back after that


def glibc_or_none() -> ctypes.CDLL | None:
    """The C library if it is glibc, whose malloc needs the help HeapTrimmer gives; None for others (musl, macOS)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


class HeapTrimmer:
    """Keeps the server near its idle size after big exports. glibc's malloc keeps what is freed for reuse, so a
    16 MiB export left RSS near its peak; worse, once a big block is freed, glibc serves blocks up to that size
    from the heap instead of pages of their own, and the heap fragments. A fixed threshold for those, and a trim
    after exports (at most once per TRIM_DELAY_S), give the memory back to the system. Elsewhere than glibc it
    does nothing."""

    def __init__(self):
        self._libc = glibc_or_none()
        self._due = threading.Event()
        if self._libc:
            self._libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)  # a fixed one: glibc then stops raising it
            threading.Thread(target=self._trim_when_due, name="ccmon-trim", daemon=True).start()

    def after_export(self) -> None:
        self._due.set()

    def _trim_when_due(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            time.sleep(TRIM_DELAY_S)
            self._libc.malloc_trim(0)


class BadExport(Exception):
    """An export that is not a valid OTLP protobuf message, or has more than MAX_RECORDS_PER_EXPORT records:
    refused whole (INVALID_ARGUMENT, HTTP 400)."""


# Where an export's records are: the protobuf field numbers leading to them from the top (logs: resource_logs,
# scope_logs, log_records; metrics: resource_metrics, scope_metrics, metrics, its data of any kind, data_points).
RECORD_FIELDS = {"logs": ((1,), (2,), (2,)), "metrics": ((1,), (2,), (2,), (5, 7, 9, 10, 11), (1,))}
EMPTY_RECORD_BYTES = 2  # a record's tag and length: an export of n bytes has at most n / 2 records


def check_record_count(kind: str, data: bytes) -> None:
    """BadExport when the serialized export has more than MAX_RECORDS_PER_EXPORT records, counted on the wire
    format, up to one more than that, without parsing any record. A loop over the messages to look into, not a
    recursive closure: that closure's reference to itself kept the view, and so each export's bytes, alive until
    the cyclic garbage collector ran (35 MB more at the peak of a benchmark's ingestion)."""
    if len(data) <= EMPTY_RECORD_BYTES * MAX_RECORDS_PER_EXPORT:
        return
    path, count = RECORD_FIELDS[kind], 0
    with memoryview(data) as view:
        messages = [(0, len(data), 0)]  # (start, end, depth along path)
        while messages:
            start, end, depth = messages.pop()
            for field, field_start, field_end in length_delimited_fields(view, start, end):
                if field not in path[depth]:
                    continue
                if depth + 1 < len(path):
                    messages.append((field_start, field_end, depth + 1))
                    continue
                count += 1
                if count > MAX_RECORDS_PER_EXPORT:
                    raise BadExport(f"over {MAX_RECORDS_PER_EXPORT} {EXPORT_ITEMS[kind]} in one export (ccmon takes "
                                    f"at most {MAX_RECORDS_PER_EXPORT} at a time)")


def length_delimited_fields(data: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message in data[start:end], the others
    skipped; BadExport for what is not protobuf's wire format."""
    position = start
    try:
        while position < end:
            key, position = wire_varint(data, position)
            wire_type = key & 7
            if wire_type == 2:
                length, position = wire_varint(data, position)
                if position + length > end:
                    raise IndexError
                yield key >> 3, position, position + length
                position += length
            elif wire_type == 0:
                position = wire_varint(data, position)[1]
            elif wire_type in (1, 5):
                position += 8 if wire_type == 1 else 4
            else:
                raise IndexError  # groups (3, 4) are not in proto3, nor OTLP; 6 and 7 are not wire types
        if position > end:
            raise IndexError
    except IndexError:
        raise BadExport("not valid OTLP protobuf: a field runs past its message") from None


def wire_varint(data: memoryview, position: int) -> tuple[int, int]:
    """The varint at `position`, and the position after it; IndexError past the data or ten bytes."""
    value = shift = 0
    while shift < 70:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7
    raise IndexError


class DecoderFailure(Exception):
    """A decoder could not decode an export (a bug, or out of memory): the server decodes it itself."""


class DecoderHung(Exception):
    """A decoder did not answer and used no CPU for DECODER_PATIENCE_S: it is killed, and the server decodes."""


def cpu_ticks(pid: int) -> int | None:
    """The CPU time a process has used (user and system, in clock ticks); None where /proc cannot tell."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


EXPORT_MESSAGES = {"logs": logs_service_pb2.ExportLogsServiceRequest,
                   "metrics": metrics_service_pb2.ExportMetricsServiceRequest}
EXPORT_ITEMS = {"logs": "log records", "metrics": "data points"}  # what Rejections counts
DECODERS = min(4, os.cpu_count() or 1)
# Decoding yields the CPU to the server's own threads: the writer, and the queries, which stay quick while
# exporters keep every core busy (a monitor refresh, p95 at 1M requests: 178 ms at the same priority, see BENCHMARKS.md).
DECODER_NICENESS = 10
BIG_EXPORT_BYTES = 1024 ** 2  # after decoding one this big, a decoder gives its memory back
# A decoder the server waits on and that uses no CPU for this long is hung (stopped with SIGSTOP, say): it is
# killed and the server decodes the export itself, well within an exporter's deadline (10 s by default, 30 s in
# the issue's case). A busy decoder always uses CPU, even at DECODER_NICENESS on a saturated machine, where CFS
# still gives it a share; a 16 MiB export takes it under a second of CPU before its first answer. Where the
# CPU time cannot be read (no /proc), a decoder silent for this long is taken as hung.
DECODER_PATIENCE_S = 2.0


def export_batches(kind: str, data: bytes, rejected: Rejections, ingest: LogsIngest) -> Iterator[Batch]:
    """The rows of a serialized export of `kind` (logs, metrics), WRITE_CHUNK_ROWS at a time."""
    check_record_count(kind, data)
    try:
        request = EXPORT_MESSAGES[kind].FromString(data)
    except DecodeError as exc:
        raise BadExport(f"not valid OTLP protobuf: {str(exc)[:200]}") from None
    if kind == "logs":
        yield from ingest.decode(request, rejected)
    else:
        projects: dict[str, str] = {}
        for rows in metric_rows(request, rejected, ingest.sources, projects):
            yield Batch(metrics=rows, projects=projects)


def decoder_loop(conn, prices: dict[str, Price] | None = None) -> None:
    """A decoder process: (kind, serialized export) in; its batches out as (batch, None), the last one as (batch or
    None, its Rejections), (None, BadExport) or (None, DecoderFailure). It ends when the server closes the pipe."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)  # a Ctrl-C or a stop meant for the server: it ends us by closing the pipe
    os.nice(DECODER_NICENESS)
    libc, ingest = glibc_or_none(), LogsIngest(prices)
    while True:
        try:
            kind, data = conn.recv()
        except (EOFError, OSError):
            return
        rejected, pending = Rejections(EXPORT_ITEMS[kind]), None
        try:
            for batch in export_batches(kind, data, rejected, ingest):
                if pending is not None:
                    conn.send((pending, None))
                pending = batch
            conn.send((pending, rejected))
        except BadExport as exc:
            conn.send((None, exc))
        except (EOFError, OSError):
            return  # the server is gone
        except Exception as exc:
            conn.send((None, DecoderFailure(f"{type(exc).__name__}: {exc}")))
        if libc and len(data) >= BIG_EXPORT_BYTES:
            data = pending = batch = None
            libc.malloc_trim(0)


class Decoders:
    """Decoding, most of ingestion's work, runs in processes of its own (DECODERS, one per core), so that it uses
    every core and leaves the server's interpreter to the writer and the queries. They are forked at start,
    before any thread exists. An export whose decoder dies is decoded in the server, as every export is once no
    decoder is left (decoding again from the start: the rows already stored are duplicates, ignored as such).
    One that hangs is killed (see DECODER_PATIENCE_S): a read or a write on its pipe waits no longer than that."""

    def __init__(self, count: int = DECODERS, prices: dict[str, Price] | None = None):
        self.ingest = LogsIngest(prices)  # for decoding in the server
        self._idle: queue.Queue = queue.Queue()
        self._alive, self._alive_lock = {}, threading.Lock()  # pid -> the server's end of its pipe
        ends = []
        for _ in range(count):
            parent, child = multiprocessing.connection.Pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    for end in (parent, *ends):  # only the server may hold a decoder's end: closing it ends the decoder
                        end.close()
                    decoder_loop(child, prices)
                finally:
                    os._exit(0)  # never back into the server's code
            child.close()
            ends.append(parent)
            with socket.socket(fileno=os.dup(parent.fileno())) as end:  # options are the socket's, not the fd's
                patience = struct.pack("ll", int(DECODER_PATIENCE_S), int(DECODER_PATIENCE_S % 1 * 1_000_000))
                end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, patience)  # mid-answer: BlockingIOError
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, patience)  # an export it does not read
            self._idle.put((pid, parent))
            self._alive[pid] = parent

    def batches(self, kind: str, data: bytes, rejected: Rejections) -> Iterator[Batch]:
        """The export's batches, decoded by an idle decoder (or here); `rejected` is filled in by the end."""
        decoder = self._checkout()
        if decoder is not None:
            try:
                yield from self._from_decoder(decoder, kind, data, rejected)
                return
            except BadExport:
                raise
            except DecoderFailure as exc:
                log.error("a decoder failed (%s); the server decodes the export itself", exc)
            except Exception as exc:  # the pipe broke (the decoder died), it hung, or its answer could not be read
                self._lost(decoder, exc)
        yield from export_batches(kind, data, rejected, self.ingest)

    def _from_decoder(self, decoder: tuple, kind: str, data: bytes, rejected: Rejections) -> Iterator[Batch]:
        conn, done = decoder[1], False
        conn.send((kind, data))
        while not done:
            batch, last = self._answer(decoder)
            if last is not None:
                done = True
                self._idle.put(decoder)  # free for the next export while this batch is written
                if isinstance(last, (BadExport, DecoderFailure)):
                    raise last
                vars(rejected).update(vars(last))
            if batch is not None:
                try:
                    yield batch
                except GeneratorExit:  # the caller stopped early (the store failed)
                    if not done:
                        self._drain(decoder)
                    raise

    def _drain(self, decoder: tuple) -> None:
        """Read the rest of an export's batches, so that the decoder's next answer is to the next export."""
        try:
            while self._answer(decoder)[1] is None:
                continue
        except Exception as exc:  # as in batches()
            self._lost(decoder, exc)
        else:
            self._idle.put(decoder)

    @staticmethod
    def _answer(decoder: tuple) -> tuple:
        """The decoder's next answer; DecoderHung when it gives none and uses no CPU for DECODER_PATIENCE_S."""
        pid, conn = decoder
        ticks = cpu_ticks(pid)
        while not conn.poll(DECODER_PATIENCE_S):
            ticks, before = cpu_ticks(pid), ticks
            if ticks is None or ticks == before:
                raise DecoderHung(f"no answer and no CPU used for {DECODER_PATIENCE_S:g} s")
        return conn.recv()

    def _checkout(self) -> tuple | None:
        while self._alive:
            try:
                return self._idle.get(timeout=0.5)
            except queue.Empty:
                continue  # all busy; or the last ones died meanwhile
        return None

    def _lost(self, decoder: tuple, exc: Exception) -> None:
        pid, conn = decoder
        conn.close()
        with self._alive_lock:
            if self._alive.pop(pid, None) is None:
                return  # close() ended it
            alive = len(self._alive)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # a decoder whose pipe failed, or that hung, is of no more use
        hung = f"it hung ({exc}) and was killed: " if isinstance(exc, (DecoderHung, BlockingIOError)) else ""
        log.error("a decoder process (pid %d) ended (%s%s); %s", pid, hung, reap(pid),
                  f"{alive} left" if alive else "exports are decoded in the server from now on")

    def close(self) -> None:
        """End the decoders: the idle ones end when their pipe closes; the others (busy with an export that
        outlived the shutdown) and any that does not end at once (stopped, say) are killed: they hold nothing
        to finish, and shutdown never waits on one."""
        with self._alive_lock:
            decoders, self._alive = self._alive, {}
        while True:
            try:
                self._idle.get_nowait()[1].close()
            except queue.Empty:
                break
        for pid in decoders:
            with contextlib.suppress(ChildProcessError):  # SIGCHLD ignored by whoever started us: reaped already
                if os.waitpid(pid, os.WNOHANG) == (0, 0):  # not ended yet
                    os.kill(pid, signal.SIGKILL)
                    reap(pid)


def reap(pid: int) -> str:
    """Wait for a child process to end; how it ended."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return "reaped elsewhere"  # SIGCHLD ignored by whoever started us: the kernel reaps children
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


class Receiver:
    """OTLP ingestion shared by the gRPC and HTTP listeners: decode (see Decoders), store, answer; a big export is
    decoded and stored a chunk at a time, so its rows never all exist at once. Raises BadExport for a message that
    is not OTLP, StorageUnavailable when the data cannot be stored now (the caller says "retry"); chunks stored
    before that are duplicates when the export comes again, and ignored as such, but for records re-dated to the
    time received (see FUTURE_TOLERANCE_MS)."""

    def __init__(self, store: Writer, decoders: Decoders | None = None):
        self.store, self.decoders, self.heap = store, decoders or Decoders(0), HeapTrimmer()

    def receive(self, kind: str, data: bytes, protocol: str, rejected: Rejections) -> tuple[int, int, int]:
        """Decode and store an export's batches; (API requests, new rows, requests waiting to be applied). The
        export's counts (see ReceiverCounts) go with its last batch, into the transaction that stores it: known
        only once the export is all decoded, one batch is held back for them (an export of rejected records only
        writes them alone)."""
        requests, new, pending, held = 0, 0, 0, None
        try:
            for batch in self.decoders.batches(kind, data, rejected):
                requests += len(batch.requests)
                if held is not None:
                    new, pending = map(operator.add, (new, pending), self.store.write(held))
                held = batch
            if rejected.total:
                accepted = rejected.total - rejected.count
                held = held or Batch()
                held.receipt = ReceiverCounts(protocol, kind, now_ms() if accepted else None, accepted, rejected.count)
            if held is not None:
                new, pending = map(operator.add, (new, pending), self.store.write(held))
        finally:
            self.heap.after_export()
        return requests, new, pending

    def logs(self, data: bytes, protocol: str) -> logs_service_pb2.ExportLogsServiceResponse:
        """Store a serialized ExportLogsServiceRequest, received over `protocol` (grpc, http/protobuf, http/json)."""
        rejected = Rejections(EXPORT_ITEMS["logs"])
        requests, new, pending = self.receive("logs", data, protocol, rejected)
        log.info("logs: %d records, %d api requests, %d new, %s%d rejected", rejected.total, requests, new,
                 f"{pending} to be applied, " if pending else "", rejected.count)
        return rejected.answer(logs_service_pb2.ExportLogsServiceResponse(), "rejected_log_records")

    def metrics(self, data: bytes, protocol: str) -> metrics_service_pb2.ExportMetricsServiceResponse:
        """Store a serialized ExportMetricsServiceRequest, received over `protocol`."""
        rejected = Rejections(EXPORT_ITEMS["metrics"])
        _, new, _ = self.receive("metrics", data, protocol, rejected)
        log.info("metrics: %d data points, %d new, %d rejected", rejected.total, new, rejected.count)
        return rejected.answer(metrics_service_pb2.ExportMetricsServiceResponse(), "rejected_data_points")

    def traces(self, data: bytes, protocol: str) -> trace_service_pb2.ExportTraceServiceResponse:
        """Accepted so exporters configured for traces do not error; ccmon has no use for spans."""
        return trace_service_pb2.ExportTraceServiceResponse()


def unavailable_status(exc: StorageUnavailable) -> ccmon_pb2.RpcStatus:
    """UNAVAILABLE with a RetryInfo, so exporters back off and send the data again."""
    retry = ccmon_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=exc.retry_after_s))
    return ccmon_pb2.RpcStatus(
        code=grpc.StatusCode.UNAVAILABLE.value[0],
        message=f"ccmon cannot store data right now ({exc}); retry later",
        details=[any_pb2.Any(type_url="type.googleapis.com/google.rpc.RetryInfo", value=retry.SerializeToString())])


OTLP_SERVICES = {"opentelemetry.proto.collector.logs.v1.LogsService": Receiver.logs,
                 "opentelemetry.proto.collector.metrics.v1.MetricsService": Receiver.metrics,
                 "opentelemetry.proto.collector.trace.v1.TraceService": Receiver.traces}


def otlp_grpc_handlers(receiver: Receiver) -> list[grpc.GenericRpcHandler]:
    """The OTLP Export methods over gRPC. Each takes its request as bytes: the decoders parse it (see Decoders)."""
    def method(handler: Callable) -> grpc.RpcMethodHandler:
        def export(data: bytes, context):
            try:
                return handler(receiver, data, "grpc")
            except BadExport as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except StorageUnavailable as exc:
                status = unavailable_status(exc)
                context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
                context.abort(grpc.StatusCode.UNAVAILABLE, status.message)
        return grpc.unary_unary_rpc_method_handler(export, response_serializer=lambda answer: answer.SerializeToString())
    return [grpc.method_handlers_generic_handler(service, {"Export": method(handler)})
            for service, handler in OTLP_SERVICES.items()]


# ---------------------------------------------------------------- OTLP/HTTP receiver: POST /v1/logs, /v1/metrics, /v1/traces

HTTP_ROUTES = {
    "/v1/logs": (logs_service_pb2.ExportLogsServiceRequest, Receiver.logs),
    "/v1/metrics": (metrics_service_pb2.ExportMetricsServiceRequest, Receiver.metrics),
    "/v1/traces": (trace_service_pb2.ExportTraceServiceRequest, Receiver.traces),
}
PROTOBUF, JSON = "application/x-protobuf", "application/json"
HEX_ID_KEYS = {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}
# RFC 9112 framing, read strictly: a body a proxy in front could frame another way is how one request hides
# another. Content-Length is 1*DIGIT (no sign, no list; 18 digits are past any limit and convert cheaply);
# a chunk size is 1*HEXDIG (no sign, no 0x), optionally followed by extensions, which ccmon ignores.
CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]+)(?:[ \t]*;[^\r\n]*)?")
CHUNK_LINE_BYTES = 4096  # a chunk-size line with its extensions, or one trailer line
CHUNK_TRAILER_LINES = 64
HTTP_MAX_CONNECTIONS = 256  # one thread each; more wait in the listen backlog
HTTP_BACKLOG = 1024  # a burst of exporters waits in the kernel's queue instead of being refused
CLIENT_TIMEOUT_S = 30  # to send a whole request after connecting or after an answer (also closes idle keep-alive)
SLOW_CLIENT_S = 1  # when every connection is taken, one still waiting for its client after this long makes way
LINGER_S = 2  # after an error answer, how long the rest of an upload is read and dropped before closing
BUSY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
               b"Connection: close\r\n\r\n")  # to a connection closed before its first answer
REFUSALS_REMEMBERED = 1024  # (address, reason) pairs; past that, refusals from new pairs go unlogged for a while


class HTTPFailure(Exception):
    """An OTLP/HTTP request answered with an error status and a google.rpc.Status body."""

    def __init__(self, status: int, code: grpc.StatusCode, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


# What every answer of the listener's pages carries (an OTLP export's answer is protobuf or JSON for an exporter):
# nothing of another origin may load, frame or be sent to, and no type is guessed from content.
PAGE_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"), ("X-Frame-Options", "DENY"),
    ("Cross-Origin-Resource-Policy", "same-origin"))
PAGE_MAX_BODY = 64 * 1024  # a page's POST body: a sign-in form, or a status line's input (Claude Code's: 2 KB)
NO_STORE = ("Cache-Control", "no-store")


@dataclasses.dataclass(frozen=True)
class PageRequest:
    """A request to one of the listener's pages (anything but an OTLP export), as its handler reads it."""
    method: str              # GET (also for HEAD, whose answer is sent without its body) or POST
    path: str
    query: str               # the query string, undecoded
    headers: Any             # the request's header fields (an email.message.Message)
    body: bytes              # a POST's body; b"" otherwise
    tls: bool
    client: str              # the client's address


@dataclasses.dataclass(frozen=True)
class PageAnswer:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()   # pairs: a field may repeat


# The listener's pages: path -> method (GET, POST) -> handler. GET / and /api/ are the web dashboard's.
Pages = dict[str, dict[str, Callable[[PageRequest], PageAnswer]]]


def text_answer(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> PageAnswer:
    return PageAnswer(status, "text/plain; charset=utf-8", (text + "\n").encode(), headers)


def json_answer(status: int, value: Any, headers: tuple[tuple[str, str], ...] = (), gzip: bool = False) -> PageAnswer:
    """JSON, gzipped for a client that takes it (the dashboard's answer shrinks about 6 times: it is polled)."""
    return packed_answer(status, "application/json", json.dumps(value, separators=(",", ":"), allow_nan=False).encode(),
                         headers, gzip)


def packed_answer(status: int, content_type: str, body: bytes, headers: tuple[tuple[str, str], ...] = (),
                  gzip: bool = False) -> PageAnswer:
    """An answer not to be cached, gzipped for a client that takes it."""
    if gzip:
        packer = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: the gzip format
        body = packer.compress(body) + packer.flush()
        headers = (("Content-Encoding", "gzip"), *headers)
    return PageAnswer(status, content_type, body, (NO_STORE, ("Vary", "Accept-Encoding"), *headers))


def json_page(token: str, answer: Callable[[dict], PageAnswer]) -> Callable[[PageRequest], PageAnswer]:
    """A POST page of JSON: the bearer token checked (when the server has one), the body read as a JSON object,
    then `answer` with it. Only application/json is taken: a web page elsewhere can send a form or text/plain to
    the listener without the browser asking first, but not JSON."""
    def page(request: PageRequest) -> PageAnswer:
        if token and not bearer_matches(request.headers.get("Authorization"), token):
            return json_answer(401, {"error": "missing or wrong bearer token"}, (("WWW-Authenticate", "Bearer"),))
        if (request.headers.get("Content-Type") or "").split(";")[0].strip().lower() != JSON:
            return json_answer(415, {"error": f"the body is sent as {JSON}"})
        try:
            asked = json.loads(request.body)
        except (ValueError, RecursionError):
            asked = None
        return answer(asked) if isinstance(asked, dict) else json_answer(400, {"error": "the body is not a JSON object"})
    return page


def bearer_matches(header: str | None, token: str) -> bool:
    """Constant-time check of an 'Authorization: Bearer <token>' value."""
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def refusal_reason(header: str | None) -> str:
    """Why a call was refused the token check, in words that repeat nothing it sent."""
    return "wrong bearer token" if (header or "").partition(" ")[0].lower() == "bearer" else "no bearer token"


class RefusalLog:
    """Refused calls, logged at most once a minute per client address and reason: a client that forgot its
    token shows in the log (a server that drops exports silently leaves no clue) without flooding it."""

    def __init__(self, interval_s: float = 60):
        self.interval_s = interval_s
        self._logged_at: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def note(self, call: str, address: str, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._logged_at.get((address, reason), -math.inf) < self.interval_s:
                return
            if len(self._logged_at) >= REFUSALS_REMEMBERED:
                self._logged_at = {key: at for key, at in self._logged_at.items() if now - at < self.interval_s}
                if len(self._logged_at) >= REFUSALS_REMEMBERED:
                    return  # a flood from many addresses: memory stays bounded, the log quiet
            self._logged_at[(address, reason)] = now
        log.warning("refused %s from %s: %s; Claude Code sends the token with OTEL_EXPORTER_OTLP_HEADERS="
                    "\"Authorization=Bearer <token>\", the monitor with %s (logged once a minute per address and "
                    "reason)", call, address, reason, TOKEN_ENV)


def inflate(body: bytes, limit: int) -> bytes:
    """gunzip, refusing output past `limit` without ever holding more than limit + 1 bytes (gzip bombs)."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, f"body is not valid gzip: {exc}") from None
    if len(data) > limit:
        raise HTTPFailure(413, grpc.StatusCode.RESOURCE_EXHAUSTED, f"decompressed body is over {limit} bytes")
    if not inflater.eof:
        raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, "gzip body is truncated")
    return data


def hex_ids_to_base64(node: Any) -> Any:
    """OTLP/JSON spells trace and span ids in hex; protobuf's JSON parser expects base64 bytes."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in HEX_ID_KEYS and isinstance(value, str):
                try:
                    node[key] = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError:
                    raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, f"{key} {value[:40]!r} is not hex") from None
            else:
                hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            hex_ids_to_base64(item)
    return node


# json.loads makes an object of each JSON value, 37 to 62 bytes each (measured: 16 MiB of empty records took the
# server to 1.24 GB); past this many (strings, objects, arrays, and what commas separate), a body is refused
# before it is parsed. Claude Code's records take about 150 each: 16 MiB of them, the default size limit, 2.2
# million, which json.loads holds in 135 MB.
MAX_JSON_VALUES = 2_500_000
# A JSON string; one left open runs to the end of the body, so that no quote starts a search of the rest (which
# made 16 MiB of '"\\' take hours).
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
# Where an OTLP/JSON document's records are (protobuf's JSON parser takes either spelling of a field's name);
# checked against MAX_RECORDS_PER_EXPORT before the parser makes a message of each.
JSON_RECORD_KEYS = {
    logs_service_pb2.ExportLogsServiceRequest: (("resourceLogs", "resource_logs"), ("scopeLogs", "scope_logs"),
                                               ("logRecords", "log_records")),
    metrics_service_pb2.ExportMetricsServiceRequest: (
        ("resourceMetrics", "resource_metrics"), ("scopeMetrics", "scope_metrics"), ("metrics",),
        ("gauge", "sum", "histogram", "exponentialHistogram", "exponential_histogram", "summary"),
        ("dataPoints", "data_points")),
    trace_service_pb2.ExportTraceServiceRequest: (("resourceSpans", "resource_spans"), ("scopeSpans", "scope_spans"),
                                                 ("spans",))}


def json_values(body: bytes) -> int:
    """About how many values json.loads would make of `body` (an upper bound), counted without parsing it."""
    unquoted, strings = JSON_STRING.subn(b"", body)
    return strings + unquoted.count(b"{") + unquoted.count(b"[") + unquoted.count(b",") + 1


def json_records(node: Any, path: tuple[tuple[str, ...], ...]) -> int:
    """How many records a parsed OTLP/JSON document has along `path` (see JSON_RECORD_KEYS); where its shape is
    not OTLP's, what is found (the parser then says what is wrong)."""
    if not isinstance(node, dict):
        return 0
    total = 0
    for key in path[0]:
        value = node.get(key)
        items = value if isinstance(value, list) else [] if value is None else [value]
        total += len(items) if len(path) == 1 else sum(json_records(item, path[1:]) for item in items)
    return total


def protobuf_body(body: bytes, content_type: str, message_type) -> bytes:
    """The export as serialized protobuf, which the decoders take: an OTLP/JSON body is converted here."""
    if content_type != JSON:
        return body
    if json_values(body) > MAX_JSON_VALUES:
        raise HTTPFailure(413, grpc.StatusCode.RESOURCE_EXHAUSTED, f"body has over {MAX_JSON_VALUES} JSON values "
                          f"(ccmon takes at most {MAX_JSON_VALUES} in one OTLP/JSON export)")
    message = message_type()
    try:
        document = json.loads(body)
        if not isinstance(document, dict):
            raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT,
                              "body is not valid OTLP/JSON: the top level is not an object")
        if json_records(document, JSON_RECORD_KEYS[message_type]) > MAX_RECORDS_PER_EXPORT:
            raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, f"body has over {MAX_RECORDS_PER_EXPORT} "
                              f"records (ccmon takes at most {MAX_RECORDS_PER_EXPORT} in one export)")
        json_format.ParseDict(hex_ids_to_base64(document), message, ignore_unknown_fields=True)
    except HTTPFailure:
        raise
    except (ValueError, RecursionError, json_format.ParseError, DecodeError) as exc:
        raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, f"body is not valid OTLP/JSON: "
                          f"{str(exc)[:200]}") from None
    return message.SerializeToString()


class HTTPConnections:
    """The listener's open connections, at most `capacity` (a thread each), and a clock on each.

    A connection's client must bring a whole request, headers and body, within `timeout_s` of the connection
    opening or of its last answer, or the connection is closed; idle keep-alive connections end that way too.
    When every place is taken, the connection whose client has owed its request longest, if longer than
    SLOW_CLIENT_S, is closed to make way for the next, so clients trickling bytes cannot keep prompt ones out.
    Only a connection whose thread is blocked reading is ever closed: one being answered, or whose bytes
    are in but not yet read, is the server's slowness, not its client's. A plain-HTTP connection closed before
    its first answer is told `503` with Retry-After (BUSY_ANSWER) first: its client may only have been slow
    to get CPU time, and an exporter retries a 503 where a silent close reads as a failure. An idle keep-alive
    connection is closed silently: its client asked nothing, and knows to reconnect."""

    def __init__(self, capacity: int, timeout_s: float):
        self.capacity, self.timeout_s = capacity, timeout_s
        self._request_began: dict[socket.socket, float] = {}  # every open connection
        self._reading: set[socket.socket] = set()  # those whose thread waits for bytes from the client
        self._unanswered: set[socket.socket] = set()  # those not answered yet
        self._closing = False
        self._changed = threading.Condition()

    def admit(self, connection: socket.socket) -> bool:
        """Take a place for a new connection, waiting for one (or making one) while all are taken; False when
        the listener is shutting down."""
        with self._changed:
            while len(self._request_began) >= self.capacity and not self._closing:
                slowest = min(self._reading, key=self._request_began.__getitem__, default=None)
                if slowest is not None and time.monotonic() - self._request_began[slowest] > SLOW_CLIENT_S:
                    self._cut(slowest)
                self._changed.wait(0.25)
            if self._closing:
                return False
            self._request_began[connection] = time.monotonic()
            self._unanswered.add(connection)
            return True

    def next_request(self, connection: socket.socket) -> None:
        """The connection was answered: the clock starts again for its next request."""
        with self._changed:
            if connection in self._request_began:
                self._request_began[connection] = time.monotonic()
            self._unanswered.discard(connection)

    @contextlib.contextmanager
    def reading(self, connection: socket.socket):
        """Around every read from the client: while it lasts, the client is the one keeping the thread."""
        with self._changed:
            self._reading.add(connection)
        try:
            yield
        finally:
            with self._changed:
                self._reading.discard(connection)

    def closed(self, connection: socket.socket) -> None:
        with self._changed:
            self._request_began.pop(connection, None)
            self._reading.discard(connection)
            self._unanswered.discard(connection)
            self._changed.notify_all()

    def close_overdue(self) -> None:
        with self._changed:
            overdue = time.monotonic() - self.timeout_s
            for connection in [c for c in self._reading if self._request_began[c] < overdue]:
                self._cut(connection)

    def close(self) -> None:
        """Shutting down: close the connections waiting for their clients, and admit no more."""
        with self._changed:
            self._closing = True
            for connection in list(self._reading):
                self._cut(connection)
            self._changed.notify_all()

    def cut(self, connection: socket.socket) -> None:
        with self._changed:
            self._cut(connection)

    def _cut(self, connection: socket.socket) -> None:
        """Shut the connection down under its thread, whose read then ends as if the client had left."""
        self._reading.discard(connection)
        try:  # the plain socket's shutdown: SSLSocket's would drop TLS state that the thread is using
            if connection in self._unanswered and not isinstance(connection, ssl.SSLSocket):
                socket.socket.send(connection, BUSY_ANSWER)  # a few bytes into an empty send buffer: no wait
            socket.socket.shutdown(connection, socket.SHUT_RDWR)
        except OSError:
            pass  # the client has already gone


class ClientReads(io.RawIOBase):
    """A connection as its handler reads it, each read known to the listener's HTTPConnections."""

    def __init__(self, connection: socket.socket, connections: HTTPConnections):
        self.connection, self.connections = connection, connections

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        with self.connections.reading(self.connection):
            try:
                return self.connection.recv_into(buffer)
            except TimeoutError:  # the client missed its deadline: closed as the listener closes the overdue
                self.connections.cut(self.connection)
                raise


class OTLPHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: an exporter reuses its connection
    server_version = f"ccmon/{VERSION}"

    def setup(self) -> None:
        connections = self.server.connections
        # Every read and write waits at most this long: a client that stops reading its answer cannot keep
        # a thread either.
        self.timeout = connections.timeout_s
        super().setup()
        self.rfile.close()  # the plain reader setup made; ours tells `connections` when the client is awaited
        self.rfile = io.BufferedReader(ClientReads(self.connection, connections))
        if isinstance(self.connection, ssl.SSLSocket):  # handshake here, not in the accepting thread
            with connections.reading(self.connection):
                self.connection.do_handshake()

    def handle_one_request(self) -> None:
        super().handle_one_request()
        self.server.connections.next_request(self.connection)

    def log_message(self, fmt: str, *args) -> None:
        log.debug("http %s %s", self.address_string(), fmt % args)

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path in self.server.pages or path not in HTTP_ROUTES and self._content_type() not in (PROTOBUF, JSON):
            self._page()  # a page's, or no exporter's (a form, curl -d): answered as pages are, in plain text
            return
        self.server.inflight.acquire()
        try:
            self._export()
        finally:
            self.server.inflight.release()

    def do_GET(self) -> None:
        """Every method but an export's POST: a page, or a refusal (404, 405) that says what there is."""
        if urlsplit(self.path).path in HTTP_ROUTES:
            self._not_allowed()
        else:
            self._page()

    do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _page(self) -> None:
        self.server.inflight.acquire()
        try:
            answer = self._page_answer()
        except Exception:  # a page's bug is logged and answered, never a traceback to the client
            log.exception("the page %s failed", self.path[:200])
            answer = text_answer(500, "internal error: the server's log says more")
        finally:
            self.server.inflight.release()
        self._answer(answer)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """What http.server refuses by itself is answered as ccmon answers, never with its HTML page: a method it
        has no do_ for (TRACE, CONNECT, made up) as every method a page or an export route does not take (405 and
        what is allowed), the rest (a request line too long, bad syntax) in plain text with the pages' headers."""
        if code == 501 and self.command and self.path.startswith("/"):
            self.do_GET()
            return
        self.close_connection = True
        self._answer(text_answer(code, message or http.HTTPStatus(code).phrase))

    def _answer(self, answer: PageAnswer) -> None:
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        for name, value in PAGE_HEADERS + answer.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.body)

    def _page_answer(self) -> PageAnswer:
        parts = urlsplit(self.path)
        methods = self.server.pages.get(parts.path)
        if methods is None:
            self.close_connection = True  # a body it may have sent is not read
            return text_answer(404, f"no such page {parts.path[:100]!r}" +
                               ("; the dashboard is at /" if "/" in self.server.pages else ""))
        method = "GET" if self.command == "HEAD" else self.command
        if method not in methods:
            self.close_connection = True
            allowed = ", ".join(sorted({*methods, *(["HEAD"] if "GET" in methods else [])}))
            return text_answer(405, f"{self.command} is not supported here; use {allowed}", (("Allow", allowed),))
        body = b""
        if method == "POST":
            try:
                body = self._read_body(PAGE_MAX_BODY)
            except HTTPFailure as failure:
                self.close_connection = True
                return text_answer(failure.status, str(failure))
        elif self.headers.get("Transfer-Encoding") or self.headers.get("Content-Length", "0").strip() != "0":
            self.close_connection = True  # a GET's body is not read: the connection cannot carry another request
        return methods[method](PageRequest(method, parts.path, parts.query, self.headers, body,
                                           isinstance(self.connection, ssl.SSLSocket), self.client_address[0]))

    def _content_type(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()

    def _export(self) -> None:
        content_type = self._content_type()
        reply_json = content_type == JSON
        try:
            path = urlsplit(self.path).path
            route = HTTP_ROUTES.get(path)
            if route is None:
                raise HTTPFailure(404, grpc.StatusCode.UNIMPLEMENTED, f"no such path {self.path[:100]!r}; "
                                  "use /v1/logs, /v1/metrics or /v1/traces")
            authorization = self.headers.get("Authorization")
            if self.server.token and not bearer_matches(authorization, self.server.token):
                self.server.refusals.note(f"OTLP/HTTP {path}", self.client_address[0], refusal_reason(authorization))
                raise HTTPFailure(401, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token",
                                  {"WWW-Authenticate": "Bearer"})
            if content_type not in (PROTOBUF, JSON):
                raise HTTPFailure(415, grpc.StatusCode.INVALID_ARGUMENT, f"unsupported Content-Type "
                                  f"{content_type[:100]!r}; use {PROTOBUF} or {JSON}")
            encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
            if encoding not in ("gzip", "identity"):
                raise HTTPFailure(415, grpc.StatusCode.INVALID_ARGUMENT, f"unsupported Content-Encoding "
                                  f"{encoding[:100]!r}; use gzip or none")
            body = self._read_body()
            if encoding == "gzip":
                body = inflate(body, self.server.max_bytes)
            message_type, handler = route
            try:
                response = handler(self.server.receiver, protobuf_body(body, content_type, message_type),
                                   "http/json" if content_type == JSON else "http/protobuf")
            except BadExport as exc:
                raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, f"body is {exc}") from None
            except StorageUnavailable as exc:
                status = unavailable_status(exc)
                raise HTTPFailure(503, grpc.StatusCode.UNAVAILABLE, status.message,
                                  {"Retry-After": str(exc.retry_after_s)}) from None
            self._send(200, response, reply_json)
        except HTTPFailure as failure:
            self.close_connection = True  # a body left unread must not be taken for the next request
            status = ccmon_pb2.RpcStatus(code=failure.code.value[0], message=str(failure))
            self._send(failure.status, status, reply_json, failure.headers)
            self._linger()

    def _linger(self) -> None:
        """After answering a request whose body may not all have been read: end our side, then read and drop
        what the client still sends (up to the size limit, for LINGER_S), so that it finishes its upload and
        reads the answer instead of finding the connection reset under it."""
        try:
            socket.socket.shutdown(self.connection, socket.SHUT_WR)  # plain TCP, as in HTTPConnections._cut
            deadline, dropped = time.monotonic() + LINGER_S, 0
            while dropped <= self.server.max_bytes and (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not (data := self.rfile.read1(65536)):
                    return
                dropped += len(data)
        except OSError:
            pass  # gone, or too slow: the connection closes either way

    def _read_body(self, limit: int | None = None) -> bytes:
        """The body (at most `limit` bytes, by default the export size limit), framed as RFC 9112 section 6 says;
        anything ambiguous is refused, never guessed at."""
        limit = self.server.max_bytes if limit is None else limit
        if self.headers.defects:  # 'Transfer-Encoding : chunked' is dropped here; a lenient proxy might obey it
            raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, "malformed header field line")
        codings, lengths = self.headers.get_all("Transfer-Encoding"), self.headers.get_all("Content-Length")
        if codings:
            if lengths:
                raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, "both Transfer-Encoding and "
                                  "Content-Length: the body's length is ambiguous")
            if self.request_version == "HTTP/1.0":
                raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, "Transfer-Encoding is not allowed in "
                                  "HTTP/1.0")
            spelled = ", ".join(codings)
            names = [name.strip().lower() for name in spelled.split(",")]
            if names[-1] != "chunked" or names.count("chunked") > 1:
                raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, f"Transfer-Encoding {spelled[:100]!r}: "
                                  "chunked must be the final coding, applied once")
            if len(names) > 1:
                raise HTTPFailure(501, grpc.StatusCode.UNIMPLEMENTED, f"Transfer-Encoding {spelled[:100]!r} is "
                                  "not supported; use chunked")
            return self._read_chunked(limit)
        if not lengths:
            raise HTTPFailure(411, grpc.StatusCode.INVALID_ARGUMENT, "Content-Length is required")
        if len(lengths) > 1:
            raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, "more than one Content-Length")
        spelled = lengths[0].strip()
        if not CONTENT_LENGTH.fullmatch(spelled):
            raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, f"Content-Length {spelled[:40]!r} is not a "
                              "byte count")
        length = int(spelled)
        if length > limit:
            raise HTTPFailure(413, grpc.StatusCode.RESOURCE_EXHAUSTED, f"body of {length} bytes is over the "
                              f"{limit} byte limit")
        body = self.rfile.read(length)
        if len(body) < length:
            raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, f"body ended after {len(body)} of its "
                              f"{length} bytes")
        return body

    def _read_chunked(self, limit: int) -> bytes:
        """A chunked body: each chunk's size counts against `limit` before any of its bytes are read."""
        chunks, total = [], 0
        while size := self._chunk_size():
            total += size
            if total > limit:
                raise HTTPFailure(413, grpc.StatusCode.RESOURCE_EXHAUSTED, f"body is over the {limit} byte limit")
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, "chunked body ended early")
            if self.rfile.read(2) != b"\r\n":
                raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, "chunked body: chunk data not followed "
                                  "by CRLF")
            chunks.append(chunk)
        for _ in range(CHUNK_TRAILER_LINES + 1):  # trailer fields, which ccmon has no use for, then an empty line
            if not self._chunk_line():
                return b"".join(chunks)
        raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, f"chunked body: more than {CHUNK_TRAILER_LINES} "
                          "trailer lines")

    def _chunk_size(self) -> int:
        line = self._chunk_line()
        match = CHUNK_SIZE_LINE.fullmatch(line)
        if not match:
            raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, f"chunked body: {line[:40]!r} is not a hex "
                              "chunk size")
        return int(match[1], 16)

    def _chunk_line(self) -> bytes:
        line = self.rfile.readline(CHUNK_LINE_BYTES + 2)
        if line.endswith(b"\r\n"):
            return line[:-2]
        if len(line) < CHUNK_LINE_BYTES + 2 and not line.endswith(b"\n"):
            raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, "chunked body ended early")
        raise HTTPFailure(400, grpc.StatusCode.INVALID_ARGUMENT, "chunked body: a line is not ended by CRLF "
                          f"within {CHUNK_LINE_BYTES} bytes")

    def _send(self, status: int, message, as_json: bool, headers: dict | None = None) -> None:
        body = json_format.MessageToJson(message, indent=None).encode() if as_json else message.SerializeToString()
        self.send_response(status)
        self.send_header("Content-Type", JSON if as_json else PROTOBUF)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _not_allowed(self) -> None:
        self.close_connection = True
        if self.command == "HEAD":
            self.send_response(405)
            self.send_header("Allow", "POST")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        status = ccmon_pb2.RpcStatus(code=grpc.StatusCode.UNIMPLEMENTED.value[0],
                                     message=f"{self.command} is not supported; OTLP/HTTP exports use POST")
        self._send(405, status, True, {"Allow": "POST"})
        self._linger()


class InFlight:
    """Counts requests being handled, so shutdown can wait for them."""

    def __init__(self):
        self._count, self._idle = 0, threading.Condition()

    def acquire(self) -> None:
        with self._idle:
            self._count += 1

    def release(self) -> None:
        with self._idle:
            self._count -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._count == 0, timeout)


class OTLPHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = HTTP_BACKLOG

    def __init__(self, address: tuple[str, int], receiver: Receiver, token: str, max_bytes: int,
                 client_timeout_s: float = CLIENT_TIMEOUT_S, pages: Pages | None = None):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.receiver, self.token, self.max_bytes, self.inflight = receiver, token, max_bytes, InFlight()
        self.pages = pages or {}
        self.connections, self.refusals = HTTPConnections(HTTP_MAX_CONNECTIONS, client_timeout_s), RefusalLog()
        super().__init__(address, OTLPHandler)

    def process_request(self, request, client_address) -> None:
        if self.connections.admit(request):
            super().process_request(request, client_address)  # a thread for the connection
        else:
            self.shutdown_request(request)

    def shutdown_request(self, request) -> None:
        super().shutdown_request(request)
        self.connections.closed(request)

    def service_actions(self) -> None:
        """Called by serve_forever between connections, at least twice a second."""
        self.connections.close_overdue()

    def shutdown(self) -> None:
        self.connections.close()  # also wakes an accept waiting for a place
        super().shutdown()

    def handle_error(self, request, client_address) -> None:
        log.debug("http connection from %s failed: %s", client_address[0], sys.exc_info()[1])


# ---------------------------------------------------------------- Wire: ccmon.v1 messages to and from domain values

AGENT_FILTER = "agent_filter"  # GetServerInfo.features: the server keeps one agent's usage when asked
# A request's agent for every agent's usage. Unset is Claude Code's alone: what every call meant before other agents
# were received, so that the Go monitor and older clients see what they saw. Servers without the agent field ignore
# it, and count what they have.
ALL_AGENTS = "all"


def ms_of(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1000 + ts.nanos // 1_000_000


def timestamp_from_ms(ms: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=ms % 1000 * 1_000_000)


def fill_token(token: ccmon_pb2.Token, usage: Usage) -> ccmon_pb2.Token:
    token.input, token.output, token.cache_read, token.cache_creation = \
        usage.input, usage.output, usage.cache_read, usage.cache_creation
    token.limited, token.cache, token.total = usage.limited, usage.cache, usage.total
    return token


def token_message(usage: Usage) -> ccmon_pb2.Token:
    return fill_token(ccmon_pb2.Token(), usage)


def stats_message(split: Split) -> ccmon_pb2.Stats:
    """Filled in place: a message given to a constructor is copied (a year of days is 366 Stats, 2 ms of copies)."""
    total = split.total
    message = ccmon_pb2.Stats(base_requests=split.base.requests, premium_requests=split.premium.requests,
                              total_requests=total.requests)
    for token, cost, usage in ((message.base_tokens, message.base_cost, split.base),
                               (message.premium_tokens, message.premium_cost, split.premium),
                               (message.total_tokens, message.total_cost, total)):
        fill_token(token, usage)
        cost.amount = usage.cost_usd
    return message


def window_message(window: LimitWindow | None) -> ccmon_pb2.LimitWindow | None:
    if window is None:
        return None
    message = ccmon_pb2.LimitWindow(used_percentage=window.percent, resets_at=timestamp_from_ms(window.resets_ms),
                                    period=window.period)
    if window.used_usd is not None:
        message.used_usd = window.used_usd
    if window.limit_usd is not None:
        message.limit_usd = window.limit_usd
    return message


def history_reading_of(info: ccmon_pb2.GetServerInfoResponse) -> HistoryReading | None:
    reading = info.history_reading
    return HistoryReading(reading.files_read, reading.files) if info.HasField("history_reading") else None


def receiver_counts_message(counts: ReceiverCounts) -> ccmon_pb2.ReceiverCounts:
    message = ccmon_pb2.ReceiverCounts(protocol=counts.protocol, signal=counts.signal, accepted=counts.accepted,
                                       rejected=counts.rejected)
    if counts.last_ms is not None:
        message.last_accepted_at.CopyFrom(timestamp_from_ms(counts.last_ms))
    return message


def receiver_counts_of(message: ccmon_pb2.ReceiverCounts) -> ReceiverCounts:
    return ReceiverCounts(message.protocol, message.signal,
                          ms_of(message.last_accepted_at) if message.HasField("last_accepted_at") else None,
                          message.accepted, message.rejected)


def reading_message(reading: LimitReading) -> ccmon_pb2.LimitReading:
    message = ccmon_pb2.LimitReading(
        session_id=reading.session_id, read_at=timestamp_from_ms(reading.read_ms), project_dir=reading.project,
        model=reading.model, five_hour=window_message(reading.five_hour), seven_day=window_message(reading.seven_day),
        spend_limit=window_message(reading.spend_limit), claude_code_version=reading.version, user=reading.user,
        agent="" if reading.agent == CLAUDE_CODE else reading.agent)
    if reading.context_percent is not None:
        message.context_percent = reading.context_percent
    return message


def window_of(message, field: str) -> LimitWindow | None:
    if not message.HasField(field):
        return None
    window = getattr(message, field)
    return LimitWindow(window.used_percentage, ms_of(window.resets_at),
                       window.used_usd if window.HasField("used_usd") else None,
                       window.limit_usd if window.HasField("limit_usd") else None, window.period)


def reading_of(message: ccmon_pb2.LimitReading) -> LimitReading:
    return LimitReading(message.session_id, ms_of(message.read_at), message.project_dir, message.model,
                        message.context_percent if message.HasField("context_percent") else None,
                        window_of(message, "five_hour"), window_of(message, "seven_day"),
                        window_of(message, "spend_limit"), message.claude_code_version, message.user,
                        message.agent or CLAUDE_CODE)


def usage_from_token(token: ccmon_pb2.Token, requests: int, cost: ccmon_pb2.Cost) -> Usage:
    return Usage(requests, token.input, token.output, token.cache_read, token.cache_creation,  # Usage's order
                 round(cost.amount * NANOS_PER_USD))


MAX_IMPORT_ROWS = 50_000  # rows in one ImportRequests call


def imported_row(r: ccmon_pb2.ImportedRequest) -> tuple:
    """An ImportedRequest as a `requests` row (REQUEST_COLUMNS; the user is set by the writer); raises BadValue.
    Its seq hashes message.id and requestId, so importing a transcript again adds nothing."""
    if not r.session_id or not 0 < r.timestamp_ms <= MAX_TIMESTAMP_MS:
        raise BadValue("an imported request needs its session_id and a timestamp")
    counts = (r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_creation_tokens)
    if not (0 <= min(counts) and max(counts) < MAX_COUNT and 0 <= r.cost_nanos <= MAX_USD * NANOS_PER_USD):
        raise BadValue(f"a token count or the cost is out of range: {counts}, {r.cost_nanos} nano-dollars")
    if r.agent and r.agent not in AGENTS:
        raise BadValue(unknown_agent(r.agent))
    seq = content_hash(f"{r.message_id}\0{r.request_id}".encode())
    return (r.timestamp_ms, r.session_id, seq, r.model or "unknown", "", *counts, r.cost_nanos, 0, None, None,
            r.request_id or None, None, None, ORIGIN_TRANSCRIPT if r.estimated else ORIGIN_TRANSCRIPT_COST,
            r.agent or CLAUDE_CODE)


def split_from_stats(stats: ccmon_pb2.Stats) -> Split:
    """The other agents' usage is what the total has beyond base and premium (none from older servers): requests or
    tokens, with their cost (each cost went over the wire as a double: the difference alone is no usage)."""
    base = usage_from_token(stats.base_tokens, stats.base_requests, stats.base_cost)
    premium = usage_from_token(stats.premium_tokens, stats.premium_requests, stats.premium_cost)
    total = usage_from_token(stats.total_tokens, stats.total_requests, stats.total_cost)
    if total.requests == base.requests + premium.requests and total.total == base.total + premium.total:
        return Split(base, premium)  # the usual answer, told apart without a Usage made (a year of days: 366)
    return Split(base, premium, Usage(*map(lambda whole, one, another: whole - one - another, vars(total).values(),
                                           vars(base).values(), vars(premium).values())))


def api_request_message(r: ApiRequest) -> ccmon_pb2.APIRequest:
    return ccmon_pb2.APIRequest(
        session_id=r.session_id, timestamp=timestamp_from_ms(r.ts_ms), model=r.model, input_tokens=r.usage.input,
        output_tokens=r.usage.output, cache_read_tokens=r.usage.cache_read,
        cache_creation_tokens=r.usage.cache_creation, total_tokens=r.usage.total, cost_usd=r.usage.cost_usd,
        duration_ms=r.usage.duration_ms, agent=r.agent)


def api_request_of(r: ccmon_pb2.APIRequest) -> ApiRequest:
    return ApiRequest(ms_of(r.timestamp), r.model, r.session_id,
                      Usage(1, r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_creation_tokens,
                            round(r.cost_usd * NANOS_PER_USD), r.duration_ms),
                      r.agent or CLAUDE_CODE)  # servers before agents send none


def session_message(session: Session) -> ccmon_pb2.SessionStats:
    return ccmon_pb2.SessionStats(
        session_id=session.session_id, user=session.user, first_request_at=timestamp_from_ms(session.first_ms),
        last_request_at=timestamp_from_ms(session.last_ms), stats=stats_message(session.split),
        models=session.models, tool_calls=session.tool_calls, tool_failures=session.tool_failures,
        api_errors=session.api_errors, from_metrics=session.from_metrics, project=session.project,
        source=session.source, agent=session.agent)


def session_of(s: ccmon_pb2.SessionStats) -> Session:
    return Session(s.session_id, s.user, ms_of(s.first_request_at), ms_of(s.last_request_at),
                   split_from_stats(s.stats), tuple(s.models), s.tool_calls, s.tool_failures, s.api_errors,
                   s.from_metrics, s.project,
                   s.source or session_source(0, s.from_metrics),  # servers before transcripts send no source
                   s.agent or CLAUDE_CODE)  # nor those before agents an agent


# An event's attributes in a timeline answer: a full timeline (MAX_TIMELINE_ENTRIES) fits in the 4 MB clients accept.
DETAILS_MAX_BYTES = 1024
DETAILS_TEXT_CHARS = 200      # a longer key or text is cut to this, ending in "…", once the whole is over the size
DETAILS_OMITTED = "ccmon.omitted_attributes"  # how many attributes did not fit


def details_json(details: dict) -> str:
    """Attributes as stored, as compact JSON; over DETAILS_MAX_BYTES, with long texts cut and as many attributes as
    fit, the shortest first (a tool's name before a command's text), DETAILS_OMITTED counting the others."""
    whole = compact_json(details) or ""
    if len(whole.encode()) <= DETAILS_MAX_BYTES:
        return whole

    def cut(text: str) -> str:
        return text if len(text) <= DETAILS_TEXT_CHARS else text[:DETAILS_TEXT_CHARS - 1] + "…"

    texts = {key: value if isinstance(value, (str, int, float, bool)) or value is None else
             json.dumps(value, sort_keys=True, separators=(",", ":"), default=json_default)  # a nested value's JSON
             for key, value in details.items()}
    kept: dict[str, Any] = {}
    for key, value in sorted(texts.items(), key=lambda item: (len(item[0]) + len(str(item[1])), item[0])):
        trial = {**kept, cut(key): cut(value) if isinstance(value, str) else value}
        if len(compact_json({**trial, DETAILS_OMITTED: len(details)}).encode()) <= DETAILS_MAX_BYTES:
            kept = trial
    return compact_json({**kept, DETAILS_OMITTED: len(details) - len(kept)})


def timeline_entry_message(entry: TimelineEntry) -> ccmon_pb2.TimelineEntry:
    message = ccmon_pb2.TimelineEntry(timestamp=timestamp_from_ms(entry.ts_ms), kind=entry.kind,
                                      details=details_json(entry.details))
    if entry.request is not None:
        message.request.CopyFrom(api_request_message(entry.request))
    return message


def timeline_entry_of(e: ccmon_pb2.TimelineEntry) -> TimelineEntry:
    return TimelineEntry(ms_of(e.timestamp), e.kind, api_request_of(e.request) if e.kind == "api_request" else None,
                         json.loads(e.details) if e.details else {})


def tool_report_message(report: ToolReport) -> ccmon_pb2.GetToolStatsResponse:
    return ccmon_pb2.GetToolStatsResponse(
        tools=[ccmon_pb2.ToolStats(tool=t.tool, calls=t.calls, successes=t.successes, p50_duration_ms=t.p50_ms,
                                   p95_duration_ms=t.p95_ms) for t in report.tools],
        decisions=[ccmon_pb2.DecisionStats(decision=d.decision, source=d.source, count=d.count)
                   for d in report.decisions],
        errors=[ccmon_pb2.ErrorStats(status_code=e.status_code, model=e.model, count=e.count) for e in report.errors],
        retries_exhausted=report.retries_exhausted)


def tool_report_of(response: ccmon_pb2.GetToolStatsResponse) -> ToolReport:
    return ToolReport(tuple(ToolFigures(t.tool, t.calls, t.successes, t.p50_duration_ms, t.p95_duration_ms)
                            for t in response.tools),
                      tuple(DecisionCount(d.decision, d.source, d.count) for d in response.decisions),
                      tuple(ApiErrorCount(e.status_code, e.model, e.count) for e in response.errors),
                      response.retries_exhausted)


def model_message(model: ModelUsage) -> ccmon_pb2.ModelStats:
    u = model.usage
    return ccmon_pb2.ModelStats(model=model.model, premium=model.agent == CLAUDE_CODE and is_premium(model.model),
                                requests=u.requests, tokens=token_message(u), cost=ccmon_pb2.Cost(amount=u.cost_usd),
                                duration_ms=u.duration_ms, ttft_ms_total=u.ttft_ms, ttft_count=u.ttft_count,
                                agent=model.agent)


def model_usage_of(m: ccmon_pb2.ModelStats) -> ModelUsage:
    return ModelUsage(m.model, dataclasses.replace(usage_from_token(m.tokens, m.requests, m.cost),
                                                   duration_ms=m.duration_ms, ttft_ms=m.ttft_ms_total,
                                                   ttft_count=m.ttft_count),
                      m.agent or CLAUDE_CODE)  # servers before agents send none


def block_message(block: UsageBlock) -> ccmon_pb2.Block:
    return ccmon_pb2.Block(start_time=timestamp_from_ms(block.start_ms), end_time=timestamp_from_ms(block.end_ms),
                           stats=stats_message(block.split), last_activity_at=timestamp_from_ms(block.last_activity_ms),
                           from_claude=block.from_claude)


def usage_block_of(b: ccmon_pb2.Block) -> UsageBlock:
    return UsageBlock(ms_of(b.start_time), ms_of(b.end_time), split_from_stats(b.stats), ms_of(b.last_activity_at),
                      b.from_claude)


def user_message(user: UserUsage) -> ccmon_pb2.UserStats:
    return ccmon_pb2.UserStats(user=user.user, stats=stats_message(user.split), sessions=user.sessions,
                               five_hour=window_message(user.five_hour), seven_day=window_message(user.seven_day),
                               agents=map(reading_message, user.agents))


def user_usage_of(u: ccmon_pb2.UserStats) -> UserUsage:
    return UserUsage(u.user, split_from_stats(u.stats), u.sessions, window_of(u, "five_hour"),
                     window_of(u, "seven_day"), tuple(map(reading_of, u.agents)))


def project_message(project: ProjectUsage) -> ccmon_pb2.ProjectStats:
    return ccmon_pb2.ProjectStats(project=project.project, stats=stats_message(project.split),
                                  sessions=project.sessions)


def project_usage_of(p: ccmon_pb2.ProjectStats) -> ProjectUsage:
    return ProjectUsage(p.project, split_from_stats(p.stats), p.sessions)


def series_point_message(point: SeriesPoint) -> ccmon_pb2.SeriesPoint:
    return ccmon_pb2.SeriesPoint(start_time=timestamp_from_ms(point.start_ms), group=point.group,
                                 stats=stats_message(point.split))


def usage_series_of(response: ccmon_pb2.GetSeriesResponse) -> UsageSeries:
    return UsageSeries(response.bucket,
                       tuple(SeriesPoint(ms_of(p.start_time), p.group, split_from_stats(p.stats)) for p in response.points),
                       tuple(reading_of(r) for r in response.readings),
                       tuple(reading_of(r) for r in response.agent_readings))


def import_counts_message(counts: ImportCounts) -> ccmon_pb2.ImportRequestsResponse:
    return ccmon_pb2.ImportRequestsResponse(imported=counts.imported, already_known=counts.already_known,
                                            readings=counts.readings)



# ---------------------------------------------------------------- Query service: ccmon.v1.QueryService over the store

# The most an answer lists (ccmon.proto says so): an answer fits gRPC's default 4 MB message limit, and a
# client looping on a query cannot hold the server's memory or its reads for long.
MAX_REQUESTS_PAGE = 1000
MAX_SESSIONS, DEFAULT_SESSIONS = 5000, 500
MAX_TIMELINE_ENTRIES = 2000  # each event's details at most DETAILS_MAX_BYTES
MAX_LIST = 1000              # users, projects, models, tools, blocks (the newest)
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # what gRPC clients accept by default; an answer over it is refused instead
# Queries answered at once: the rest of the RPC threads stay free for exports, however many clients loop on queries.
QUERY_SLOTS = 8
MAX_SERIES_BUCKETS = 5000    # GetSeries: buckets of a period (13 years of days, 200 days of hours)
MAX_SERIES_READINGS = 5000   # and the newest readings it lists
SERIES_GROUPS = ("", "model", "user", "project")
CALIBRATION_READINGS = 2000  # the readings GetLimits looks through (the last 30 days of a busy status line)
CALIBRATION_WINDOWS = 20     # and the windows it calibrates from, newest first
# On the HTTP listener, for ccmon.pyz's quick route (GetServerInfo.quick_route_http_port): the status line and
# --format rendered by the server
STATUS_LINE_PAGE, QUICK_QUERY_PAGE = "/api/statusline", "/api/format"


def timestamp_ms(request, field: str, default: int) -> int:
    """A request's Timestamp field in ms, clamped to what the store holds; `default` when unset."""
    if not request.HasField(field):
        return default
    return min(max(ms_of(getattr(request, field)), 0), MAX_TIMESTAMP_MS + 1)


def guarding_every_rpc(cls: type) -> type:
    """Wrap every RPC method of a servicer so that SQLite errors, and a database no longer at its path, become gRPC
    statuses; at most QUERY_SLOTS run at once, and no answer is larger than MAX_ANSWER_BYTES."""
    def wrapped(method: Callable) -> Callable:
        def answer(self, request, context):
            if not self.slots.acquire(blocking=False):  # waiting would hold an RPC thread an export needs
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server is answering {QUERY_SLOTS} queries "
                              "already; ask again in a moment")
            try:
                response = method(self, request, context)
            except sqlite3.Error as exc:
                self.storage_failure(context, exc)
            except DatabaseMoved as exc:
                if "moved" not in self._failures_logged:
                    self._failures_logged.add("moved")
                    log.critical("queries are refused: %s", exc)
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            finally:
                self.slots.release()
            if response.ByteSize() > MAX_ANSWER_BYTES:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the answer would be {response.ByteSize():,} "
                              f"bytes, over the {MAX_ANSWER_BYTES:,} clients accept: ask for less")
            return response
        return answer

    for name in [name for name in vars(cls) if name[:1].isupper()]:  # the RPCs
        setattr(cls, name, wrapped(getattr(cls, name)))
    return cls


@guarding_every_rpc
class QueryService(ccmon_pb2_grpc.QueryServiceServicer):
    def __init__(self, reader: Reader, started_ms: int, writer: Writer):
        self.reader, self.started_ms, self.writer = reader, started_ms, writer
        self.quick_route_http_port = 0  # the HTTP listener's, once it answers STATUS_LINE_PAGE and QUICK_QUERY_PAGE
        self.history_reading: HistoryReading | None = None  # the local server's, while it reads the transcripts
        self._failures_logged: set[str] = set()
        self.slots = threading.BoundedSemaphore(QUERY_SLOTS)

    def storage_failure(self, context, exc: sqlite3.Error) -> None:
        """Abort with a status that says why the database cannot answer (logged once per kind)."""
        code, what = (grpc.StatusCode.DATA_LOSS, "the database is damaged") if is_damage(exc) else \
            (grpc.StatusCode.UNAVAILABLE, "the database cannot be read right now")
        if what not in self._failures_logged:
            self._failures_logged.add(what)
            log.error("%s (%s): queries fail until it is fixed", what, exc)
        context.abort(code, f"{what}: {exc}")

    def _period(self, request) -> tuple[int, int]:
        return timestamp_ms(request, "start_time", 0), timestamp_ms(request, "end_time", now_ms())

    @staticmethod
    def _user(request) -> str | None:
        return request.user or None

    @staticmethod
    def _project(request) -> str | None:
        return request.project or None

    @staticmethod
    def _agent(request, context) -> str | None:
        """The agent whose usage the request keeps (see ALL_AGENTS), None for every agent's."""
        if request.agent == ALL_AGENTS:
            return None
        if request.agent and request.agent not in AGENTS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{unknown_agent(request.agent)}, or {ALL_AGENTS!r}")
        return request.agent or CLAUDE_CODE

    def GetStats(self, request, context):
        split = self.reader.split(self.reader.usage(*self._period(request), user=self._user(request),
                                                    project=self._project(request),
                                                    agent=self._agent(request, context)))
        return ccmon_pb2.GetStatsResponse(stats=stats_message(split))

    def GetAPIRequests(self, request, context):
        start, end = self._period(request)
        user, project, agent = self._user(request), self._project(request), self._agent(request, context)
        limit = request.limit if 0 < request.limit <= MAX_REQUESTS_PAGE else MAX_REQUESTS_PAGE
        rows = self.reader.requests_page(start, end, limit, request.offset, request.oldest_first, user, project,
                                         agent)
        if not request.HasField("oldest_first"):  # the Go ccmon's client: the newest page, in time order
            rows.reverse()
        total = sum(u.requests for u in self.reader.usage(start, end, user=user, project=project,
                                                          agent=agent).values())
        return ccmon_pb2.GetAPIRequestsResponse(total_count=total, requests=[api_request_message(r) for r in rows])

    def GetUsage(self, request, context):
        zone = zone_or_none(request.timezone or "UTC")
        if zone is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown timezone {request.timezone[:100]!r}")
        end = min(timestamp_ms(request, "end_time", now_ms()), MAX_TIMESTAMP_MS - 86400_000)
        start = timestamp_ms(request, "start_time", -1)
        try:
            days = self.reader.days(zone, start if start >= 0 else None, end, self._user(request),
                                    self._project(request), self._agent(request, context))
        except (OverflowError, ValueError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the period has days past the year 9999 in {zone.key}; "
                          "end it earlier")
        return ccmon_pb2.GetUsageResponse(days=[ccmon_pb2.DailyUsage(date=day.date, stats=stats_message(day.split))
                                                for day in days])

    def GetModelStats(self, request, context):
        found = self.reader.models(*self._period(request), user=self._user(request), project=self._project(request),
                                   agent=self._agent(request, context))
        return ccmon_pb2.GetModelStatsResponse(models=[model_message(model) for model in found[:MAX_LIST]])

    def GetSessionStats(self, request, context):
        session = request.session_id or self.reader.latest_session()
        response = ccmon_pb2.GetSessionStatsResponse(stats=stats_message(Split()))
        found = self.reader.sessions(0, 0, session_id=session) if session else []
        if found:
            summary = found[0]
            response.session_id = summary.session_id
            response.stats.CopyFrom(stats_message(summary.split))
            response.first_request_at.CopyFrom(timestamp_from_ms(summary.first_ms))
            response.last_request_at.CopyFrom(timestamp_from_ms(summary.last_ms))
        return response

    def GetSessions(self, request, context):
        found = self.reader.sessions(*self._period(request), user=self._user(request),
                                    limit=min(max(request.limit, 0) or DEFAULT_SESSIONS, MAX_SESSIONS),
                                    project=self._project(request), agent=self._agent(request, context))
        return ccmon_pb2.GetSessionsResponse(sessions=[session_message(s) for s in found])

    def GetSessionTimeline(self, request, context):
        limit = request.limit if 0 < request.limit <= MAX_TIMELINE_ENTRIES else MAX_TIMELINE_ENTRIES
        entries = self.reader.timeline(request.session_id, limit)
        return ccmon_pb2.GetSessionTimelineResponse(session_id=request.session_id,
                                                    entries=[timeline_entry_message(entry) for entry in entries])

    def GetToolStats(self, request, context):
        report = self.reader.tool_report(*self._period(request), user=self._user(request),
                                         project=self._project(request), agent=self._agent(request, context))
        return tool_report_message(dataclasses.replace(report, tools=report.tools[:MAX_LIST],
                                                       decisions=report.decisions[:MAX_LIST],
                                                       errors=report.errors[:MAX_LIST]))

    def GetUsers(self, request, context):
        found = self.reader.users(*self._period(request), self._project(request),
                                  self._agent(request, context))[:MAX_LIST]
        return ccmon_pb2.GetUsersResponse(users=[user_message(user) for user in found])

    def GetBlocks(self, request, context):
        if self._agent(request, context) not in (None, CLAUDE_CODE):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"blocks are Claude's 5-hour windows, of Claude Code's "
                          f"usage alone: not {request.agent}'s")
        found = self.reader.blocks(*self._period(request), user=self._user(request),
                                   project=self._project(request))[-MAX_LIST:]
        return ccmon_pb2.GetBlocksResponse(blocks=[block_message(block) for block in found])

    def GetProjects(self, request, context):
        found = self.reader.projects(*self._period(request), user=self._user(request),
                                     project=self._project(request), agent=self._agent(request, context))[:MAX_LIST]
        return ccmon_pb2.GetProjectsResponse(projects=[project_message(project) for project in found])

    def ReportStatusLine(self, request, context):
        reading = reading_of(request.reading)
        zone = zone_or_none(request.timezone or "UTC")
        if not reading.session_id or zone is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a reading needs its session_id, and a known timezone")
        now = now_ms()
        reading = dataclasses.replace(reading, read_ms=min(reading.read_ms or now, now), agent=CLAUDE_CODE)
        problem = reading_problem(reading, now)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"not a reading Claude Code gives: {problem}")
        try:
            self.writer.record_reading(reading)
        except StorageUnavailable as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"ccmon cannot store the reading right now ({exc})")
        user = self.reader.session_user(reading.session_id)
        response = ccmon_pb2.ReportStatusLineResponse(user=user or "")
        found = self.reader.sessions(0, 0, session_id=reading.session_id)
        if found:
            response.session.CopyFrom(stats_message(found[0].split))
        if user is not None:
            midnight = day_bounds(zone, now, 1)[0][1]
            response.today.CopyFrom(stats_message(self.reader.split(self.reader.usage(midnight, now, user=user))))
        return response

    def GetLimits(self, request, context):
        user, now = self._user(request), timestamp_ms(request, "at", now_ms())
        response = ccmon_pb2.GetLimitsResponse()
        for latest in self.reader.readings(user, now - LEARN_FROM_MS, now):
            response.latest.CopyFrom(reading_message(latest))
        # those with Claude's windows: readings without (an API key's) must not push the live ones out
        recent = self.reader.readings(user, now - LEARN_FROM_MS, now, CALIBRATION_READINGS, with_limits=True)
        response.team = user is None and len(self.reader.named_claude_users(now - LEARN_FROM_MS)) > 1
        account = self._limits_account(user, recent, now, response.team)
        if account is not None:
            counted = account or None
            if counted != user:  # everyone's asked for, one user's account answered: that user's readings
                recent = self.reader.readings(counted, now - LEARN_FROM_MS, now, CALIBRATION_READINGS,
                                              with_limits=True)
            response.user = account
            self._claude_limits(response, recent, counted, now)
        for agent in AGENTS[1:]:  # their own plans' limits: the newest reading of the past week
            newest = self.reader.readings(user, now - 7 * DAY_MS, now, with_limits=True, agent=agent)
            response.agents.extend(map(reading_message, newest))
        return response

    def _limits_account(self, user: str | None, recent: list[LimitReading], now: int, team: bool) -> str | None:
        """Whose usage Claude's windows and capacities count (GetLimitsResponse.user; '' for everyone's): the user
        asked for. Asked for everyone: everyone's on one person's server (not `team`: usage no one is named for,
        such as transcripts imported before telemetry, is theirs too); on a team's, the one user with a name the
        live readings are of, since Claude's windows are one account's. None (no windows, no capacities) for a
        team's without one such user."""
        if user is not None:
            return user
        if not team:
            return ""
        readers = {reading.user for reading in recent
                   if live_window(reading.five_hour, now) or live_window(reading.seven_day, now)} - {""}
        return readers.pop() if len(readers) == 1 else None

    def _claude_limits(self, response, recent: list[LimitReading], user: str | None, now: int) -> None:
        """Claude's live windows as last read among `recent` (newest first) and the capacities calibrated from them
        against `user`'s premium tokens (everyone's: None)."""
        for field in ("five_hour", "seven_day"):
            live = [reading for reading in recent if live_window(getattr(reading, field), now)]
            if live:
                getattr(response, f"{field}_now").CopyFrom(reading_message(live[0]))
        for field, span in (("five_hour", BLOCK_MS), ("seven_day", 7 * DAY_MS)):
            newest_per_window: dict[int, tuple[LimitReading, LimitWindow]] = {}
            for reading in recent:  # newest first: the first reading of a window has seen the most of it
                window = getattr(reading, field)  # one read after its window reset is a share of a window over
                if window is not None and window.resets_ms > reading.read_ms and \
                        len(newest_per_window) < CALIBRATION_WINDOWS:
                    newest_per_window.setdefault(claude_window_key(window.resets_ms), (reading, window))
            samples = [(self.reader.split(self.reader.usage(window.resets_ms - span, reading.read_ms,
                                                            user=user)).premium.limited, window.percent)
                       for reading, window in newest_per_window.values()]
            tokens, count = window_capacity(samples)
            if tokens is not None:
                getattr(response, field).CopyFrom(ccmon_pb2.WindowCapacity(tokens=tokens, readings=count))

    def GetSeries(self, request, context):
        zone = zone_or_none(request.timezone or "UTC")
        end = timestamp_ms(request, "end_time", now_ms())
        start = timestamp_ms(request, "start_time", max(end - 30 * DAY_MS, 0))
        problem = (f"unknown bucket {request.bucket[:100]!r} (hour, day or week)"
                   if request.bucket not in SERIES_BUCKETS else
                   f"unknown group_by {request.group_by[:100]!r} (model, user, project, or empty)"
                   if request.group_by not in SERIES_GROUPS else
                   f"unknown timezone {request.timezone[:100]!r}" if zone is None else
                   "the period ends before it starts" if end < start else "")
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        try:
            starts = bucket_starts(zone, request.bucket, start, end, MAX_SERIES_BUCKETS)
        except (OverflowError, ValueError):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the period has {request.bucket}s past the year 9999 "
                          f"in {zone.key}; end it earlier")
        if starts is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the period has more than {MAX_SERIES_BUCKETS} "
                          f"{request.bucket}s: ask for a shorter period or a larger bucket")
        points = self.reader.series(starts, start, end, request.group_by, self._user(request), self._project(request),
                                    self._agent(request, context))
        readings = self.reader.readings(self._user(request), start, end - 1, MAX_SERIES_READINGS, with_limits=True)
        others = [reading for agent in AGENTS[1:] for reading in reversed(self.reader.readings(
            self._user(request), start, end - 1, MAX_SERIES_READINGS, with_limits=True, agent=agent))]
        return ccmon_pb2.GetSeriesResponse(bucket=request.bucket, points=map(series_point_message, points),
                                           readings=map(reading_message, reversed(readings)),
                                           agent_readings=map(reading_message, others))

    def ImportRequests(self, request, context):
        if len(request.requests) > MAX_IMPORT_ROWS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_IMPORT_ROWS} requests a call")
        try:
            rows = [imported_row(r) for r in request.requests]
        except BadValue as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"an imported request is not valid: {exc}")
        readings = [reading_of(r) for r in request.readings]
        problem = next((f"{reading.agent}: {problem}" for reading in readings
                        for problem in [agent_reading_problem(reading, now_ms())] if problem), "")
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"an imported limit reading is not valid: {problem}")
        if request.dry_run:
            known = self.reader.known_requests(rows)
            return import_counts_message(ImportCounts(len(rows) - known, known))
        projects: dict[str, str] = {}
        for r in request.requests:  # where the session started (its first request's cwd)
            if r.project_dir:
                projects.setdefault(r.session_id, r.project_dir)
        try:
            counts = self.writer.import_requests(rows, projects, request.user) if rows else ImportCounts(0, 0)
            if readings:
                counts = dataclasses.replace(counts, readings=self.writer.record_agent_readings(readings))
        except StorageUnavailable as exc:  # ImportInterrupted says what is stored: sending again finds it known
            context.abort(grpc.StatusCode.UNAVAILABLE, f"ccmon cannot store the requests right now ({exc})")
        return import_counts_message(counts)

    def GetServerInfo(self, request, context):
        totals = self.reader.totals()
        response = ccmon_pb2.GetServerInfoResponse(version=VERSION, total_requests=totals.requests,
                                                   usage_records=totals.rows,
                                                   started_at=timestamp_from_ms(self.started_ms))
        last = self.reader.last_request_ms()
        if last is not None:
            response.last_request_at.CopyFrom(timestamp_from_ms(last))
        response.receivers.extend(map(receiver_counts_message, self.reader.receiver_counts()))
        response.database_path = str(self.reader.path)
        response.default_database = self.reader.path == default_database_path()
        response.features.append(AGENT_FILTER)
        response.quick_route_http_port = self.quick_route_http_port
        if reading := self.history_reading:
            response.history_reading.CopyFrom(ccmon_pb2.HistoryReading(files_read=reading.files_read,
                                                                       files=reading.files))
        return response


# ---------------------------------------------------------------- Server: listeners, authentication, TLS, retention, shutdown

SWEEP_INTERVAL_S = 6 * 3600
LOOPBACK_HOSTS = {"localhost", "::1", "[::1]"}


class ServerError(Exception):
    """The server cannot start (port taken, bad database): reported as one line, exit 1."""


def peer_address(peer: str) -> str:
    """The client's address in a gRPC peer string: 'ipv4:10.0.0.5:51234', 'ipv6:%5B::1%5D:51234'."""
    kind, _, address = peer.partition(":")
    return unquote(address).rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else peer


class TokenAuth(grpc.ServerInterceptor):
    """Every RPC (OTLP and QueryService) must carry 'authorization: Bearer <token>'; refusals are logged."""

    def __init__(self, token: str):
        self.token, self.refusals = token, RefusalLog()

    def intercept_service(self, continuation, details):
        authorization = dict(details.invocation_metadata or ()).get("authorization")
        if bearer_matches(authorization, self.token):
            return continuation(details)

        def refuse(request, context):  # the client's address is known here, in the call, not in `details`
            self.refusals.note(f"gRPC {details.method}", peer_address(context.peer()), refusal_reason(authorization))
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        return grpc.unary_unary_rpc_method_handler(refuse)


def start_grpc_server(config: Config, receiver: Receiver, service: QueryService) -> tuple[grpc.Server, int]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="ccmon-rpc"),
        interceptors=[TokenAuth(config.server_token)] if config.server_token else [],
        options=[("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
                 ("grpc.max_receive_message_length", config.max_message_bytes)])
    server.add_generic_rpc_handlers(otlp_grpc_handlers(receiver))
    ccmon_pb2_grpc.add_QueryServiceServicer_to_server(service, server)
    tls = config.server_tls
    try:
        if tls:
            credentials = grpc.ssl_server_credentials([(read_pem(tls.key), read_pem(tls.cert))],
                                                      root_certificates=read_pem(tls.ca),
                                                      require_client_auth=tls.ca is not None)
            port = server.add_secure_port(config.server_address, credentials)
        else:
            port = server.add_insecure_port(config.server_address)
    except RuntimeError:
        port = 0
    if not port:
        raise ServerError(f"cannot listen on {config.server_address}: the port is in use or the "
                          "address is not on this machine (set --server-address)")
    server.start()
    return server, port


def start_http_server(config: Config, receiver: Receiver, pages: Pages | None = None) -> tuple[OTLPHTTPServer, int]:
    host, port = parse_address(config.server_http_address, fail_as=ServerError)
    try:
        httpd = OTLPHTTPServer((host.strip("[]"), port), receiver, config.server_token, config.max_message_bytes,
                               pages=pages)
    except OSError as exc:
        raise ServerError(f"cannot listen on {config.server_http_address}: {exc.strerror} "
                          "(set --server-http-address, or 'off')") from None
    tls = config.server_tls
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert, tls.key)
        if tls.ca:
            context.load_verify_locations(tls.ca)
            context.verify_mode = ssl.CERT_REQUIRED
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    # serve_forever looks for shutdown() every 0.1 s (not 0.5): a stopping server ends 0.4 s sooner
    threading.Thread(target=httpd.serve_forever, args=(0.1,), name="ccmon-http", daemon=True).start()
    return httpd, httpd.server_address[1]


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def warn_if_exposed(config: Config) -> None:
    for address in filter(None, (config.server_address, config.server_http_address)):
        if not is_loopback(address) and not config.server_token:
            log.warning("LISTENING ON %s WITHOUT A TOKEN: anyone who can reach this address can send data and "
                        "read your usage. Set server.token (or %s), or bind to 127.0.0.1.", address, TOKEN_ENV)


def retention_loop(store: Writer, retention_s: int, stop: threading.Event) -> None:
    while True:
        cutoff = now_ms() - retention_s * 1000
        try:
            deleted = store.sweep(cutoff)
            log.info("retention: deleted %d rows older than %s", deleted,
                     dt.datetime.fromtimestamp(cutoff / 1000, dt.timezone.utc).isoformat(timespec="seconds"))
        except (StorageUnavailable, sqlite3.Error) as exc:
            log.error("retention sweep failed, will try again: %s", exc)
        if stop.wait(SWEEP_INTERVAL_S):
            return


def start_listeners(config: Config, store: Writer, decoders: Decoders,
                    pages: Callable[[QueryService], Pages] | None = None) \
        -> tuple[grpc.Server, int, OTLPHTTPServer | None, int, QueryService]:
    """Both listeners started, or neither (a ServerError in one line); the HTTP listener with the `pages` made for
    the query service."""
    receiver = Receiver(store, decoders)
    service = QueryService(Reader(config.database_path, store.moved, store.buckets, store.catch_up), now_ms(),
                           store)
    server = None
    try:
        server, port = start_grpc_server(config, receiver, service)
        httpd, http_port = start_http_server(config, receiver, pages(service) if pages else None) \
            if config.server_http_address else (None, 0)
        if httpd and {STATUS_LINE_PAGE, QUICK_QUERY_PAGE} <= httpd.pages.keys():
            service.quick_route_http_port = http_port
    except (ServerError, ssl.SSLError, OSError) as exc:
        if server:
            server.stop(None)
        raise exc if isinstance(exc, ServerError) else ServerError(f"cannot start: {exc}") from None
    return server, port, httpd, http_port, service


def log_start(config: Config, port: int, http_port: int, pages: Iterable[str] = ()) -> None:
    scheme = "TLS" + (" with client certificates" if config.server_tls and config.server_tls.ca else "") \
        if config.server_tls else "plaintext"
    log.info("ccmon %s: gRPC listening on %s:%d (OTLP logs/metrics/traces + QueryService), %s, %s", VERSION,
             config.server_address.rsplit(":", 1)[0], port, scheme,
             "token required" if config.server_token else "no token")
    if http_port:
        log.info("OTLP/HTTP listening on %s:%d (POST /v1/logs, /v1/metrics, /v1/traces%s)",
                 config.server_http_address.rsplit(":", 1)[0], http_port,
                 ("; the web dashboard at /" if "/" in pages else "") +
                 ("; Prometheus metrics at /metrics" if "/metrics" in pages else ""))
    log.info("database %s, retention %s", config.database_path,
             f"{config.server_retention_s // 3600}h" if config.server_retention_s else "never")
    warn_if_exposed(config)


def catch_stop_signals() -> list[int]:
    """From now on SIGINT and SIGTERM are recorded in the list returned, not acted on: the handler may interrupt
    code holding a lock. Caught before the server says it is ready, so a supervisor's stop is never lost."""
    received: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, _: received.append(number))
    return received


def wait_for_stop_signal(received: list[int]) -> int:
    """Block until a stop signal is recorded; returns it. The main thread wakes to look, because the kernel may
    hand a signal to any thread."""
    while not received:
        time.sleep(0.2)
    return received[0]


SHUTDOWN_S = 8  # within the 10 s Docker and systemd give before SIGKILL


def run_server(config: Config, on_ready: Callable[[QueryService, int, int, threading.Event], None] | None = None,
               pages: Callable[[QueryService], Pages] | None = None) -> int:
    """Serve until SIGINT or SIGTERM. `on_ready(service, port, http_port, stop)` runs once the server is ready;
    `stop` is set when it starts to stop. The HTTP listener also answers `pages(service)` (the web dashboard, the
    status line)."""
    # The writer binding rows, the export threads taking decoded batches and the queries share the GIL; a short
    # switch interval keeps each from waiting up to 5 ms for another whenever it needs the GIL back.
    sys.setswitchinterval(0.0005)
    decoders = Decoders(prices=config.prices)  # first: they are forked, which must happen before any thread starts
    try:
        store = Writer(config.database_path, prices=config.prices)
    except StorageError as exc:
        decoders.close()
        raise ServerError(str(exc)) from None
    try:
        server, port, httpd, http_port, service = start_listeners(config, store, decoders, pages)
    except ServerError:
        store.close()
        store.remove_if_new()
        decoders.close()
        raise
    log_start(config, port, http_port, httpd.pages if httpd else ())
    stop = threading.Event()
    if config.server_retention_s:
        threading.Thread(target=retention_loop, args=(store, config.server_retention_s, stop),
                         name="ccmon-retention", daemon=True).start()
    received = catch_stop_signals()
    log.info("ready: gRPC %s:%d%s", config.server_address.rsplit(":", 1)[0], port,  # the last start-up line
             f", HTTP {config.server_http_address.rsplit(':', 1)[0]}:{http_port}" if httpd else "")
    if on_ready:
        on_ready(service, port, http_port, stop)
    signum = wait_for_stop_signal(received)
    deadline = time.monotonic() + SHUTDOWN_S
    log.info("%s: finishing in-flight calls", signal.Signals(signum).name)
    stop.set()
    if httpd:
        httpd.shutdown()  # stop accepting; requests being handled finish below
    stopped = server.stop(grace=SHUTDOWN_S / 2)
    if httpd:
        httpd.inflight.wait_idle(timeout=max(0.0, deadline - time.monotonic() - 2))
        httpd.server_close()
    stopped.wait(max(0.0, deadline - time.monotonic() - 2))
    service.reader.close()
    store.close(drain_s=max(0.5, deadline - time.monotonic()))
    decoders.close()
    log.info("stopped; database closed")
    return 0


# ---------------------------------------------------------------- Client: a small QueryService client for the monitor, reports and quick query

class ServerUnreachable(Exception):
    """The query server did not answer, or something else did; the message is short enough for a status line."""


class ImportRefused(ServerUnreachable):
    """The server refused a batch of imported requests as not valid (its reason in full)."""


NOT_CCMON = "not a ccmon server (it does not answer ccmon.v1.QueryService)"
# What gRPC reports when an HTTP/1.1 server answers its HTTP/2 preface, in plaintext or over TLS (no h2 in ALPN)
HTTP_PORT_SIGNS = ("Failed parsing HTTP/2", "missing selected ALPN property")


# What gRPC reports when a connection never completes: a listener that accepts and says nothing
SILENCE_SIGNS = ("timed out", "Timeout occurred", "before receiving SETTINGS")


def describe_rpc_error(exc: grpc.RpcError, address: str, timeout_s: float) -> str:
    details = (exc.details() or "").splitlines()[0] if exc.details() else ""
    silence = f"nothing answered at {address} within {timeout_s:g} s"
    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
        return NOT_CCMON
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN) and \
            any(sign in details for sign in HTTP_PORT_SIGNS):
        return "this is an HTTP port; the query service is on the gRPC port"
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        if any(word in details.lower() for word in ("ssl", "tls", "handshake", "certificate")):
            return "TLS handshake failed (check monitor.tls_ca and the server's certificate)"
        if any(word in details.lower() for word in ("dns resolution failed", "errors resolving", "not resolve")):
            return "cannot resolve the server's host name"
        if "Connection refused" in details:
            return "connection refused"
        if any(sign in details for sign in SILENCE_SIGNS):
            return silence
        if "Socket closed" in details:  # closed at our plaintext HTTP/2 preface: what a TLS listener does
            return (f"the server speaks TLS (it closed a plaintext connection): use "
                    f"https://{re.sub(r'^https?://', '', address, flags=re.IGNORECASE)} or monitor.tls_ca")
        return f"server unavailable ({details[:80]})" if details else "server unavailable"
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        return f"the server refused the token ({TOKEN_ENV} or monitor.token)"
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return silence
    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # ccmon's server says what to do: in full
        return f"the server cannot answer: {details[:400]}"
    return f"{exc.code().name.lower()}: {details[:80]}"  # the server's words: printed through printable


GO_CCMON_METHODS = {"GetStats", "GetAPIRequests"}  # what the original Go ccmon server answers
GO_CCMON_ONLY = "the Go ccmon server answers only GetStats and GetAPIRequests"
GO_CCMON_ZEROS = "the Go ccmon server records no tokens or cost for Claude Code 2.x (its figures are zeros)"


class GoCcmonServer(ServerUnreachable):
    """The server answered, but it is the Go ccmon, without the query asked for."""


class NoAgentFilter(ConfigError):
    """An agent filter was asked of a server that would ignore it (an older ccmon, or the Go ccmon) and answer
    every agent's usage as if it were that agent's."""


class Client:
    """The QueryService as plain values; every call raises ServerUnreachable rather than a gRPC error.
    Against the original Go ccmon server, ccmon's additional queries come back empty, or, with
    go_extras_empty=False (for reports, where empty would be wrong), raise ServerUnreachable saying so."""

    def __init__(self, address: str, timeout_s: float = 5.0, token: str = "", tls: TLSFiles | None = None,
                 go_extras_empty: bool = True):
        self.address, self.timeout_s, self.go_extras_empty = address, timeout_s, go_extras_empty
        self._go_ccmon: bool | None = None  # whether the server is the Go ccmon, once a query has shown it
        self.unanswered: set[str] = set()   # methods the Go ccmon could not answer (answered empty instead)
        self._tls, self._channel = tls, None
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._features: frozenset[str] | None = None

    @functools.cached_property
    def _stub(self) -> ccmon_pb2_grpc.QueryServiceStub:
        """The channel to the server, opened at the first call."""
        target = re.sub(r"^https?://", "", self.address, flags=re.IGNORECASE).rstrip("/")
        tls = self._tls
        if tls:
            try:
                credentials = grpc.ssl_channel_credentials(read_pem(tls.ca), read_pem(tls.key), read_pem(tls.cert))
            except OSError as exc:  # checked when the configuration was read; gone or changed since
                raise ServerUnreachable(f"cannot read the TLS files: {exc.strerror} ({exc.filename})") from None
            options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
            self._channel = grpc.secure_channel(target, credentials, options)
        else:
            self._channel = grpc.insecure_channel(target)
        return ccmon_pb2_grpc.QueryServiceStub(self._channel)

    @classmethod
    def for_config(cls, config: Config, timeout_s: float = 5.0, go_extras_empty: bool = True) -> Client:
        return cls(config.monitor_server, timeout_s, config.monitor_token, config.monitor_tls, go_extras_empty)

    def _call(self, method: str, request):
        try:
            return self._invoke(method, request)
        except grpc.RpcError as exc:
            return self._failed(method, exc)

    def _failed(self, method: str, exc: grpc.RpcError):
        """A call's error as ServerUnreachable, or an empty answer where the Go ccmon has none to give."""
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED and method not in GO_CCMON_METHODS and self._is_go_ccmon():
            if self.go_extras_empty:
                self.unanswered.add(method)
                return getattr(ccmon_pb2, method + "Response")()  # nothing to show
            raise GoCcmonServer(GO_CCMON_ONLY) from None
        raise ServerUnreachable(describe_rpc_error(exc, self.address, self.timeout_s)) from None

    def _invoke(self, method: str, request):
        return getattr(self._stub, method)(request, timeout=self.timeout_s, metadata=self._metadata)

    def _is_go_ccmon(self) -> bool:
        """Whether the server answers GetStats, as the Go ccmon does, though not a method ccmon added (a server
        without ccmon's QueryService answers neither). Asked once, over an empty period: cheap."""
        if self._go_ccmon is None:
            now = timestamp_from_ms(now_ms())
            try:
                self._invoke("GetStats", ccmon_pb2.GetStatsRequest(start_time=now, end_time=now))
                self._go_ccmon = True
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise ServerUnreachable(describe_rpc_error(exc, self.address, self.timeout_s)) from None
                self._go_ccmon = False
        return self._go_ccmon

    def _period(self, request, start_ms: int | None, end_ms: int | None, user: str | None = None,
                project: str | None = None, agent: str | None = None):
        if start_ms is not None:
            request.start_time.CopyFrom(timestamp_from_ms(start_ms))
        if end_ms is not None:
            request.end_time.CopyFrom(timestamp_from_ms(end_ms))
        if user:
            request.user = user
        if project:
            request.project = project
        if agent:
            if AGENT_FILTER not in self.features():
                raise NoAgentFilter(f"the server at {self.address} cannot keep one agent's usage (it is an older ccmon "
                                    f"server, or the Go ccmon): upgrade it, or leave out the agent filter")
            request.agent = agent
        else:
            request.agent = ALL_AGENTS  # unset would be Claude Code's alone
        return request

    def stats(self, start_ms: int | None, end_ms: int, user: str | None = None, project: str | None = None,
              agent: str | None = None) -> Split:
        # From the epoch rather than unset: the Go ccmon counts nothing without a start.
        request = self._period(ccmon_pb2.GetStatsRequest(), start_ms or 0, end_ms, user, project, agent)
        return split_from_stats(self._call("GetStats", request).stats)

    def api_requests(self, start_ms: int | None, end_ms: int, limit: int, offset: int, oldest_first: bool,
                     user: str | None = None, project: str | None = None, agent: str | None = None) -> RequestsPage:
        request = self._period(ccmon_pb2.GetAPIRequestsRequest(limit=limit, offset=offset, oldest_first=oldest_first),
                               start_ms or 0, end_ms, user, project, agent)  # the Go ccmon needs a start
        page = self._call("GetAPIRequests", request)
        rows = sorted((api_request_of(r) for r in page.requests), key=lambda row: row.ts_ms,
                      reverse=not oldest_first)  # the Go ccmon answers oldest first whatever is asked
        return RequestsPage(tuple(rows), page.total_count)

    def server_info(self) -> ccmon_pb2.GetServerInfoResponse:
        """Empty (no version) from the Go ccmon, which has no GetServerInfo."""
        return self._call("GetServerInfo", ccmon_pb2.GetServerInfoRequest())

    def features(self) -> frozenset[str]:
        """What the server does beyond older ones (GetServerInfo.features), asked once."""
        if self._features is None:
            self._features = frozenset(self.server_info().features)
        return self._features

    def latest_session(self) -> SessionUsage:
        response = self._call("GetSessionStats", ccmon_pb2.GetSessionStatsRequest())
        return SessionUsage(response.session_id, split_from_stats(response.stats))

    def days(self, start_ms: int | None, end_ms: int, timezone: str, user: str | None = None,
             project: str | None = None, agent: str | None = None) -> tuple[DayUsage, ...]:
        request = self._period(ccmon_pb2.GetUsageRequest(timezone=timezone), start_ms, end_ms, user, project, agent)
        return tuple(DayUsage(day.date, split_from_stats(day.stats)) for day in self._call("GetUsage", request).days)

    def models(self, start_ms: int | None, end_ms: int, user: str | None = None,
               project: str | None = None, agent: str | None = None) -> tuple[ModelUsage, ...]:
        request = self._period(ccmon_pb2.GetModelStatsRequest(), start_ms, end_ms, user, project, agent)
        return tuple(model_usage_of(m) for m in self._call("GetModelStats", request).models)

    def sessions(self, start_ms: int | None, end_ms: int, user: str | None = None,
                 limit: int = 500, project: str | None = None, agent: str | None = None) -> tuple[Session, ...]:
        request = self._period(ccmon_pb2.GetSessionsRequest(limit=limit), start_ms, end_ms, user, project, agent)
        return tuple(session_of(s) for s in self._call("GetSessions", request).sessions)

    def timeline(self, session_id: str) -> tuple[TimelineEntry, ...]:
        response = self._call("GetSessionTimeline", ccmon_pb2.GetSessionTimelineRequest(session_id=session_id))
        return tuple(timeline_entry_of(e) for e in response.entries)

    def tools(self, start_ms: int | None, end_ms: int, user: str | None = None,
              project: str | None = None, agent: str | None = None) -> ToolReport:
        return tool_report_of(self._call("GetToolStats", self._period(ccmon_pb2.GetToolStatsRequest(), start_ms,
                                                                      end_ms, user, project, agent)))

    def report_status_line(self, reading: LimitReading, timezone: str) -> StatusLineFigures:
        """Store a status line reading; returns its session's figures and its user's today."""
        response = self._call("ReportStatusLine", ccmon_pb2.ReportStatusLineRequest(
            reading=reading_message(reading), timezone=timezone))
        return StatusLineFigures(split_from_stats(response.session) if response.HasField("session") else None,
                                 split_from_stats(response.today) if response.HasField("today") else None,
                                 response.user or None)

    def import_requests(self, rows: list[ccmon_pb2.ImportedRequest], user: str, dry_run: bool = False,
                        readings: Iterable[LimitReading] = ()) -> ImportCounts:
        """Send requests read from transcripts (and other agents' limit readings read from their histories); with
        dry_run, nothing is stored: the counts say what would be. Raises ImportRefused, with the server's whole
        reason, when it refuses one of them (it then stores none)."""
        request = ccmon_pb2.ImportRequestsRequest(requests=rows, user=user, dry_run=dry_run,
                                                  readings=map(reading_message, readings))
        try:
            response = self._invoke("ImportRequests", request)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ImportRefused(exc.details() or "") from None
            response = self._failed("ImportRequests", exc)
        return ImportCounts(response.imported, response.already_known, response.readings)

    def blocks(self, start_ms: int | None, end_ms: int, user: str | None = None,
               project: str | None = None) -> tuple[UsageBlock, ...]:
        """The blocks overlapping the period, oldest first."""
        response = self._call("GetBlocks", self._period(ccmon_pb2.GetBlocksRequest(), start_ms, end_ms, user, project))
        return tuple(usage_block_of(b) for b in response.blocks)

    def limits(self, user: str | None, at_ms: int) -> ClaudeLimits:
        """Claude's own limits for a user (everyone: None) at a moment: live readings and calibrated capacities."""
        response = self._call("GetLimits", ccmon_pb2.GetLimitsRequest(user=user or "", at=timestamp_from_ms(at_ms)))
        return ClaudeLimits(
            reading_of(response.five_hour_now) if response.HasField("five_hour_now") else None,
            reading_of(response.seven_day_now) if response.HasField("seven_day_now") else None,
            response.five_hour.tokens if response.HasField("five_hour") else None, response.five_hour.readings,
            response.seven_day.tokens if response.HasField("seven_day") else None, response.seven_day.readings,
            tuple(map(reading_of, response.agents)), user if user is not None else response.user or None,
            response.team)

    def latest_reading(self) -> LimitReading | None:
        """The newest status line reading of anyone's (of the last 30 days), None when there is none."""
        response = self._call("GetLimits", ccmon_pb2.GetLimitsRequest())
        return reading_of(response.latest) if response.HasField("latest") else None

    def users(self, start_ms: int | None, end_ms: int, project: str | None = None,
              agent: str | None = None) -> tuple[UserUsage, ...]:
        """Users by cost, with Claude's live windows of theirs."""
        response = self._call("GetUsers", self._period(ccmon_pb2.GetUsersRequest(), start_ms, end_ms,
                                                       project=project, agent=agent))
        return tuple(user_usage_of(u) for u in response.users)

    def projects(self, start_ms: int | None, end_ms: int, user: str | None = None,
                 project: str | None = None, agent: str | None = None) -> tuple[ProjectUsage, ...]:
        """Projects by cost; '' is the sessions without a project."""
        response = self._call("GetProjects", self._period(ccmon_pb2.GetProjectsRequest(), start_ms, end_ms, user,
                                                          project, agent))
        return tuple(project_usage_of(p) for p in response.projects)

    def series(self, start_ms: int | None, end_ms: int | None, bucket: str, timezone: str, group_by: str = "",
               user: str | None = None, project: str | None = None, agent: str | None = None) -> UsageSeries:
        """The period's usage per hour, local day or week (per model, user or project with group_by), and Claude's
        limit readings in it (the user's), oldest first."""
        request = self._period(ccmon_pb2.GetSeriesRequest(bucket=bucket, timezone=timezone, group_by=group_by),
                               start_ms, end_ms, user, project, agent)
        return usage_series_of(self._call("GetSeries", request))

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()


class ServiceRefusal(Exception):
    """A QueryService method called in this process aborted (its status code's name and message)."""


class DirectContext:
    """The context a QueryService method is given when called in this process: an abort raises ServiceRefusal."""

    @staticmethod
    def abort(code: grpc.StatusCode, details: str) -> None:
        raise ServiceRefusal(f"{code.name.lower()}: {details}")


class ServiceClient(Client):
    """The Client of the QueryService in this process: the server answering for a client (the status line over
    HTTP) asks what that client would, without a channel. Its failures are ServerUnreachable too."""

    def __init__(self, service: QueryService):
        super().__init__("this server", timeout_s=0.0)
        self.service = service

    def _invoke(self, method: str, request):
        try:
            return getattr(self.service, method)(request, DirectContext())
        except ServiceRefusal as exc:
            raise ServerUnreachable(str(exc)) from None


# ---------------------------------------------------------------- Figures: limits, projections and snapshots from the server's answers

@dataclasses.dataclass(frozen=True)
class Query:
    """What one screen needs from the server."""
    tab: str
    start_ms: int | None
    end_ms: int
    offset: int
    limit: int
    oldest_first: bool
    timezone: str
    limits: LimitQuery | None = None  # block and weekly figures, when tracked
    period_is_block: bool = False     # the period is the current automatic block, known once limits are in
    user: str | None = None
    session_id: str | None = None  # the session whose timeline is open
    fetch: Callable[[Client, Query], Any] | None = None  # what the tab shows beyond what every screen has
    project: str | None = None
    burnup: bool = False           # the tab draws the current 5-hour window's burn-up: its hours are fetched
    agent: str | None = None       # one agent's usage only (Claude's limits and blocks stay Claude's)


@dataclasses.dataclass(frozen=True)
class LimitQuery:
    """How to find the current block and its limit."""
    mode: int | str | None      # fixed start hour, "auto", or None (no block tracking)
    now_ms: int
    learn: bool                 # claude.max_tokens = "auto"
    floor: int | None           # the configured or plan limit (the learned limit's floor)
    track_week: bool = True     # the week's figures are wanted even without a reading of Claude's week


@dataclasses.dataclass(frozen=True)
class LimitFigures:
    """Where the user stands against Claude's windows: the current block and the week, by ccmon's own counts and
    by Claude's own readings."""
    window: tuple[int, int] | None          # the current block, None between automatic blocks
    block: Split                            # usage in it so far
    recent_rate: float                      # premium limited tokens per minute since recent_pace_start
    limit: int | None                       # the block limit in force (configured, plan, learned or calibrated)
    learned_from: int | None                # blocks the limit was learned from; None when not learned
    weekly: dict[str, Usage]                # the week (Claude's when read, else the rolling 7 days), per family
    claude: ClaudeLimits = ClaudeLimits()   # Claude's own: live readings and calibrated capacities
    calibrated_from: int | None = None      # readings the block limit was calibrated from; None when not
    weekly_window: tuple[int, int] | None = None  # Claude's week, from a live reading; None: the rolling 7 days
    window_from_claude: bool = False        # the block is Claude's own window, from a live reading

    @property
    def user(self) -> str | None:
        """Whose usage the block and the week count: the account Claude's windows count (see GetLimits)."""
        return self.claude.user


@dataclasses.dataclass(frozen=True)
class WeeklyLimit:
    """The weekly limit in force, if any, and the readings it was calibrated from (None: set by the user)."""
    tokens: int | None
    calibrated_from: int | None = None


def weekly_limit_in_force(limits: LimitFigures, configured: int | None) -> WeeklyLimit:
    """claude.weekly_max_tokens when set, else the calibrated capacity of Claude's week while a reading of it is
    live."""
    if configured:
        return WeeklyLimit(configured)
    if limits.weekly_window and limits.claude.seven_day_capacity:
        return WeeklyLimit(limits.claude.seven_day_capacity, limits.claude.seven_day_readings)
    return WeeklyLimit(None)


def block_status(limits: LimitFigures, now: int) -> BlockStatus | None:
    if limits.window is None:
        return None
    start, end = limits.window
    return BlockStatus(start, end, min(max(now, start), end), limits.block.premium.limited, limits.limit,
                       limits.recent_rate)


def burnup_window(limits: LimitFigures, now: int) -> tuple[int, int] | None:
    """The 5-hour window a burn-up draws: the current block, else (without block tracking) Claude's own window
    while a reading of it is live."""
    five = limits.claude.window("five_hour", now)
    return limits.window or ((five.resets_ms - BLOCK_MS, five.resets_ms) if five else None)


def weekly_premium(limits: LimitFigures) -> Usage:
    return sum((usage for family, usage in limits.weekly.items() if family != "haiku"), Usage())


def usage_by_family(models: Iterable[ModelUsage]) -> dict[str, Usage]:
    """Claude Code's usage by model family (Claude's weekly caps are by family); the other agents' is no family's."""
    by_family: dict[str, Usage] = {}
    for m in models:
        if m.agent == CLAUDE_CODE:
            by_family[model_family(m.model)] = by_family.get(model_family(m.model), Usage()) + m.usage
    return dict(sorted(by_family.items()))


def limit_figures(client: Client, query: LimitQuery, zone: ZoneInfo, user: str | None) -> LimitFigures:
    """The current block (Claude's own window while a reading of it is live, else as query.mode finds it), its
    limit (calibrated, learned, configured or the plan's) and the week (Claude's when read, else rolling), of the
    usage Claude's windows count: `user`'s, or asked for everyone's, as GetLimits says (one user's on a team's
    server)."""
    now = query.now_ms
    claude = client.limits(user, now)
    user = claude.user
    five, seven = claude.window("five_hour", now), claude.window("seven_day", now)
    calibrated = claude.five_hour_capacity if query.learn else None
    learn = query.learn and calibrated is None
    history = client.blocks(now - (LEARN_FROM_MS if learn else DAY_MS), now, user) \
        if learn or (query.mode == "auto" and five is None) else ()
    from_claude = query.mode is not None and five is not None
    window = (five.resets_ms - BLOCK_MS, five.resets_ms) if from_claude else \
        block_window(query.mode, now, zone, [(block.start_ms, block.end_ms) for block in history])
    limit, learned_from, calibrated_from = query.floor, None, None
    if calibrated is not None:
        limit, calibrated_from = calibrated, claude.five_hour_readings
    elif learn:
        limit, learned_from = learned_limit([block.split.premium.limited for block in history if block.end_ms <= now],
                                            query.floor)
    weekly_window = (seven.resets_ms - 7 * DAY_MS, seven.resets_ms) if seven else None
    weekly = usage_by_family(client.models(weekly_window[0] if weekly_window else now - 7 * DAY_MS, now, user)) \
        if query.track_week or seven else {}
    recent = recent_pace_start(now)
    return LimitFigures(window, client.stats(window[0], now, user) if window else Split(),
                        client.stats(recent, now, user).premium.limited / ((now - recent) / 60_000),
                        limit, learned_from, weekly, claude, calibrated_from, weekly_window, from_claude)


@dataclasses.dataclass(frozen=True)
class CurrentRequests:
    """The Current tab's data: the period's totals, the other agents' usage in it by agent (in AGENTS' order;
    asked for only when there is some), and one page of its requests."""
    period: Split
    page: RequestsPage
    others: tuple[tuple[str, Usage], ...] = ()


def usage_by_agent(models: Iterable[ModelUsage]) -> tuple[tuple[str, Usage], ...]:
    """The other agents' usage, by agent in AGENTS' order, from their models'."""
    summed: dict[str, Usage] = {}
    for model in models:
        if model.agent != CLAUDE_CODE:
            summed[model.agent] = summed.get(model.agent, Usage()) + model.usage
    return tuple((agent, summed[agent]) for agent in sorted(summed, key=lambda a: (AGENTS + (a,)).index(a)))


def period_readings(client: Client, start: int, end: int, timezone: str, user: str | None) -> UsageSeries:
    """Every reading of the period, Claude's and the other agents', oldest first: the series' readings (by week,
    as its points are not used: the fewest of them). An agent's answer holding the most GetSeries lists (its
    newest MAX_SERIES_READINGS) is asked again for the time up to its oldest reading, whose moment's readings
    come whole with that next answer, until every reading of the agent is in."""
    def answer(until: int) -> dict[str, list[LimitReading]]:
        series = client.series(start, until, "week", timezone, user=user)
        return {agent: [r for r in series.readings + series.agent_readings if r.agent == agent] for agent in AGENTS}

    first = answer(end)
    kept: dict[str, list[LimitReading]] = {}
    for agent in AGENTS:
        pages, page = [], first[agent]
        while len(page) >= MAX_SERIES_READINGS:
            oldest = page[0].read_ms
            newer = [r for r in page if r.read_ms > oldest]
            if not newer:  # the whole answer at one moment: nothing older can be told apart
                break
            pages.append(newer)
            page = answer(oldest + 1)[agent]
        kept[agent] = [r for readings in [page, *reversed(pages)] for r in readings]
    return UsageSeries("week", (), tuple(kept[CLAUDE_CODE]), tuple(r for a in AGENTS[1:] for r in kept[a]))


def week_user(readings: Iterable[LimitReading]) -> str | None:
    """Whose week the Charts tab draws against Claude's weekly limit: the newest weekly reading's user (readings
    come filtered to the monitor's user already); None without a weekly reading."""
    return next((r.user for r in reversed(tuple(readings)) if r.seven_day is not None), None)


CHART_WEEKS = 4  # the Charts tab's hours: the heatmap's weeks; the last 24 hours and 7 days are its newest


def chart_series(client: Client, query: Query) -> UsageSeries:
    """The Charts tab's data: the last CHART_WEEKS weeks by the hour, with the readings of Claude's limits in
    them. Where those were the most GetSeries lists (the newest MAX_SERIES_READINGS of everyone's: a busy team),
    the week chart's are asked again: every reading of the last 7 days of its user (week_user), so that they
    cover its week."""
    series = client.series(query.end_ms - CHART_WEEKS * 7 * DAY_MS, query.end_ms, "hour", query.timezone,
                           user=query.user, project=query.project, agent=query.agent)
    if len(series.readings) < MAX_SERIES_READINGS:
        return series
    week = period_readings(client, query.end_ms - 7 * DAY_MS, query.end_ms, query.timezone,
                           query.user or week_user(series.readings) or None)
    return dataclasses.replace(series, readings=week.readings)


def current_requests(client: Client, query: Query) -> CurrentRequests:
    period = client.stats(query.start_ms, query.end_ms, query.user, query.project, query.agent)
    others = usage_by_agent(client.models(query.start_ms, query.end_ms, query.user, query.project, query.agent)) \
        if period.other != Usage() else ()
    return CurrentRequests(period, client.api_requests(query.start_ms, query.end_ms, query.limit, query.offset,
                                                       query.oldest_first, query.user, query.project, query.agent),
                           others)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The server's answers for one Query: what every screen shows, and what its tab fetched."""
    query: Query
    taken_ms: int
    server_requests: int                      # usage records ever stored, to tell an empty database apart
    limits: LimitFigures | None = None
    users: tuple[UserUsage, ...] = ()         # the Users tab and the `u` filter, with their live Claude windows
    data: Any = None                          # what query.fetch returned
    unanswered: str = ""                      # why the server could not answer the tab (the Go ccmon)
    projects: tuple[ProjectUsage, ...] = ()   # the Projects tab and `p`
    block_series: UsageSeries | None = None   # the current 5-hour window by the hour, and Claude's readings in it
    agents: tuple[str, ...] = ()              # the agents with usage in the period (whatever the `g` filter), for `g`
    history: HistoryReading | None = None     # the local server's first reading of the transcripts, while under way


def fetch_snapshot(client: Client, query: Query) -> Snapshot:
    """Everything one screen shows: the figures every tab has, then what the query's tab fetches."""
    info = client.server_info()
    limits = limit_figures(client, query.limits, zone_or_none(query.timezone), query.user) if query.limits else None
    if query.period_is_block and limits is not None:  # the current automatic block, or nothing between blocks
        query = dataclasses.replace(query, start_ms=limits.window[0] if limits.window else query.end_ms)
    # The burn-up by the hour from the rollups: exact at each hour's end however busy the window, and six points
    # at most, where a page of the window's requests would miss the oldest of a busy one.
    window = burnup_window(limits, query.end_ms) if query.burnup and limits is not None else None
    block_series = client.series(window[0], query.end_ms, "hour", query.timezone, user=limits.user) \
        if window else None  # the usage the block counts
    client.unanswered.clear()
    users = client.users(query.start_ms, query.end_ms, query.project, query.agent)  # the Users tab and `u`
    projects = client.projects(query.start_ms, query.end_ms, query.user, agent=query.agent)  # the tab and `p`
    agents = {model.agent for model in client.models(query.start_ms, query.end_ms, query.user, query.project)} \
        if AGENT_FILTER in client.features() else set()  # `g` only where the server can filter
    data = None
    if query.fetch:
        client.unanswered.clear()
        data = query.fetch(client, query)
    return Snapshot(query, now_ms(), info.usage_records if info.version else -1, limits, users, data,
                    GO_CCMON_ONLY if client.unanswered else "", projects, block_series,
                    tuple(agent for agent in AGENTS if agent in agents), history_reading_of(info))


@dataclasses.dataclass(frozen=True)
class AgentUsage:
    """An agent's usage in a period, and how many of its models had some."""
    agent: str
    usage: Usage
    models: int


def usage_of_agents(models: Iterable[ModelUsage]) -> list[AgentUsage]:
    """Each agent's usage, from its models' (an agent's usage is its models', as the agent filter reads it), highest
    cost first, then in AGENTS' order."""
    used: dict[str, list[Usage]] = {}
    for model in models:
        used.setdefault(model.agent, []).append(model.usage)
    return sorted((AgentUsage(agent, sum(usages, Usage()), len(usages)) for agent, usages in used.items()),
                  key=lambda a: (-a.usage.cost_nanos, (AGENTS + (a.agent,)).index(a.agent)))


# ---------------------------------------------------------------- Text: figures, names and tables, shared by quick query, reports and the monitor

@dataclasses.dataclass(frozen=True)
class MonitorSettings:
    server: str
    zone: ZoneInfo
    block_mode: int | str | None     # fixed start hour, "auto", or None
    limit: int | None                # configured or plan block limit (a learned limit's floor)
    refresh_s: int
    learn: bool = False              # claude.max_tokens = "auto"
    weekly_limit: int | None = None
    alerts: tuple[int, ...] = ()
    alert_command: str = ""
    limit_from_plan: bool = False    # `limit` is the plan's figure, a guess (claude.max_tokens 0 or "auto")

    @classmethod
    def from_config(cls, config: Config) -> MonitorSettings:
        return cls(config.monitor_server, config.zone, config.block_mode, token_limit(config.plan, config.max_tokens),
                   config.refresh_interval_s, config.max_tokens == "auto", config.weekly_max_tokens or None,
                   config.alert_percents, config.alert_command,
                   config.max_tokens in (0, "auto") and config.plan in PLAN_TOKEN_LIMITS)

    def limit_query(self, now: int) -> LimitQuery:
        """Claude's own limits are always asked for; ccmon's block and week figures when tracked."""
        return LimitQuery(self.block_mode, now, self.learn, self.limit,
                          track_week=self.block_mode is not None or bool(self.weekly_limit))


# The periods the monitor's keys and the web dashboard offer: key -> (name, length; None: from the start of time, or
# the current block).
PERIODS = {"h": ("last hour", 3600_000), "d": ("last 24 hours", 86400_000), "w": ("last 7 days", 7 * 86400_000),
           "m": ("last 30 days", 30 * 86400_000), "a": ("all time", None), "b": ("current block", None)}


def format_count(n: float) -> str:
    """950, 12.3K, 4.56M, 1.20B: three significant digits past a thousand."""
    if abs(n) < 1000:
        return str(int(round(n)))
    for unit, size in (("K", 1e3), ("M", 1e6), ("B", 1e9), ("T", 1e12)):
        value = n / size
        if abs(value) < 999.5 or unit == "T":
            return f"{value:.{2 if abs(value) < 9.995 else 1 if abs(value) < 99.95 else 0}f}{unit}"
    raise AssertionError("unreachable")


def files_read(reading: HistoryReading) -> str:
    """How far the local server's first reading of the histories has come: '3 of 929 files'."""
    return f"{reading.files_read} of {reading.files} files" if reading.files else "looking for files"


def half_up(numerator: int, denominator: int) -> int:
    """numerator / denominator to the nearest whole number, halves up (away from zero): the one rounding rule
    of every figure shown, applied to exact integers so that $0.06225 shows as $0.0623 and 20.5% as 21%."""
    quotient = (2 * abs(numerator) + denominator) // (2 * denominator)
    return -quotient if numerator < 0 else quotient


def format_cost(nanos: int) -> str:
    """$0.0421 below a dollar (single requests cost cents), $1,234.57 above; halves rounded up."""
    sign, nanos = ("-" if nanos < 0 else ""), abs(nanos)
    ten_thousandths = half_up(nanos, NANOS_PER_USD // 10_000)
    if 0 < nanos and ten_thousandths == 0:
        return "<$0.0001"
    if 0 < ten_thousandths < 10_000:
        return f"{sign}$0.{ten_thousandths:04d}"
    cents = half_up(nanos, NANOS_PER_USD // 100)
    return f"{sign}${cents // 100:,}.{cents % 100:02d}"


def format_percent(value: float) -> str:
    """20.5 -> 21%: whole percents, halves up. A float percent is read at nine decimals, which is what it
    carries of the ratio of integers it came from (41 / 200 * 100 is 20.499999999999996)."""
    exact = decimal.Decimal(repr(float(value))).quantize(decimal.Decimal("1e-9"))
    return f"{half_up(*exact.as_integer_ratio())}%"


# C0 and C1 control characters and DEL: ESC, BEL, CR and their kind move the cursor, ring, retitle the terminal
# or start an escape sequence; names from telemetry and status line input are anyone's text.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")


def valid_text(text: str) -> str:
    """The text with each lone UTF-16 surrogate as U+FFFD: JSON can escape one (a string cut inside an emoji, a
    Windows file name), but UTF-8, and so protobuf, SQLite and the terminal, cannot hold it."""
    if text.isascii():
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def printable(text: str) -> str:
    """Text as it may reach a terminal: each control character as its Python escape (ESC as \\x1b, a newline
    as \\x0a), so that it is seen rather than obeyed. Every text output passes through it."""
    return CONTROL_CHARACTERS.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def json_text(value: Any, **options) -> str:
    """JSON for a terminal or a pipe: json.dumps escapes every control character but DEL."""
    return json.dumps(value, **options).replace("\x7f", "\\u007f")


def short_user(name: str) -> str:
    """A hashed user id (Claude Code's 64-hex user.id) cut to what tells users apart; names and emails whole."""
    return name[:10] + "~" if len(name) > 24 and re.fullmatch(r"[0-9a-f]+", name) else name


def short_session(session_id: str) -> str:
    """A session id cut to 8 characters, enough to tell a person's sessions apart: the first ones, but the last of a
    UUIDv7 (Codex's conversations), whose first ones are the time it began, alike for sessions begun together. An
    agent's metrics session (a name, with spaces) whole."""
    if " " in session_id:
        return session_id
    return session_id[-8:] if uuid7_ms(session_id) is not None else session_id[:8]


def short_model(model: str) -> str:
    """claude-sonnet-4-5-20250929 -> claude-sonnet-4-5: the date suffix only costs width."""
    return re.sub(r"-\d{8}$", "", model)


NO_PROJECT = "(no project)"


def project_labels(projects: Iterable[str]) -> dict[str, str]:
    """Short names for projects where a table is narrow: a folder's last component, with as many components
    before it as tell it from the others' (/a/web/app and /b/api/app: web/app and api/app); names as they are;
    NO_PROJECT for ''."""
    paths = {project: [part for part in re.split(r"[/\\]", project) if part] or [project]
             for project in set(projects) if project}
    labels = {"": NO_PROJECT}
    for project, path in paths.items():
        depth = 1
        while depth < len(path) and any(other[-depth:] == path[-depth:] for name, other in paths.items()
                                        if name != project):
            depth += 1
        labels[project] = "/".join(path[-depth:])
    return labels


def project_forms(project: str, labels: dict[str, str]) -> tuple[str, ...]:
    """A project's name from longest to shortest, as a table cell: its full path, then its label."""
    return (project, labels[project]) if project and labels[project] != project else (labels[project],)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def format_duration(ms: int) -> str:
    """1h05m, 12m, 45s, 850ms."""
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms // 1000
    if seconds < 60:
        return f"{seconds}s" if ms >= 10_000 else f"{ms / 1000:.1f}s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes}m"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def format_rate(rate: float) -> str:
    return f"{format_count(rate)}/min"


def local_time(ms: int, zone: ZoneInfo, fmt: str = "%H:%M") -> str:
    return dt.datetime.fromtimestamp(ms / 1000, zone).strftime(fmt)


def reset_time(ms: int, now: int, zone: ZoneInfo) -> str:
    """14:00 today, Mon 09:00 on another day."""
    same_day = local_time(ms, zone, "%Y-%m-%d") == local_time(now, zone, "%Y-%m-%d")
    return local_time(ms, zone, "%H:%M" if same_day else "%a %H:%M")


def reading_age(read_ms: int, now: int) -> str:
    """How old Claude's figure is: 'just now', '2 min ago', '1h05m ago'."""
    age = max(0, now - read_ms)
    if age < 60_000:
        return "just now"
    return f"{age // 60_000} min ago" if age < HOUR_MS else f"{format_duration(age)} ago"


# -- tables: columns that fit the width, most important first; the monitor and reports lay out tables alike

@dataclasses.dataclass(frozen=True)
class Column:
    title: str
    width: int              # the least it is shown at: wide enough for its usual cells
    priority: int           # columns with the highest numbers are dropped first on narrow screens
    left: bool = False


# A cell's text, or its forms from longest to shortest (a full model name, then without its date suffix):
# the longest form that fits its column is shown.
Cell = str | tuple[str, ...]


def cell_forms(cell: Cell) -> tuple[str, ...]:
    return (cell,) if isinstance(cell, str) else cell


def form_at(cell: Cell, level: int) -> str:
    """A cell's form `level` steps up from its shortest (its longest when it has fewer)."""
    forms = cell_forms(cell)
    return forms[max(0, len(forms) - 1 - level)]


def form_widths(title: str, cells: list[Cell]) -> list[int]:
    """The width a column needs to show its title and every one of its cells whole, in each form from the
    shortest."""
    depth = max((len(cell_forms(cell)) for cell in cells), default=1)
    return [max([len(title)] + [len(form_at(cell, level)) for cell in cells]) for level in range(depth)]


@dataclasses.dataclass(frozen=True)
class Fitted:
    index: int          # in the table's columns
    column: Column
    width: int
    level: int          # the form its cells show in: 0 for their shortest


def fit_columns(columns: list[Column], rows: list[list[Cell]], width: int, gap: int = 1) -> list[Fitted]:
    """Choose the columns that fit at their least widths, most important first. Then widen them with the rest
    of the line where their cells need it: first so every cell shows whole in its shortest form (columns that
    can have all they need, then the others with what is left), then to longer forms for the columns whose
    cells all fit in them. In column order, `gap` spaces apart."""
    by_priority = sorted(range(len(columns)), key=lambda i: columns[i].priority)
    widths: dict[int, int] = {}
    spare = width + gap  # each column costs its width and the gap before it
    for i in by_priority:
        if columns[i].width + gap <= spare:
            widths[i] = columns[i].width
            spare -= columns[i].width + gap
    needs = {i: form_widths(columns[i].title, [row[i] for row in rows]) for i in widths}
    depth = max(map(len, needs.values()), default=0)
    for level, partly in [(0, False), (0, True), *((level, False) for level in range(1, depth))]:
        for i in (i for i in by_priority if i in widths and level < len(needs[i])):
            grow = max(0, needs[i][level] - widths[i])
            if partly or grow <= spare:
                widths[i] += min(grow, spare)
                spare -= min(grow, spare)
    return [Fitted(i, columns[i], widths[i], max(level for level, need in enumerate(needs[i])
                                                  if level == 0 or need <= widths[i]))  # the longest that fits
            for i in sorted(widths)]


def row_text(fitted: list[Fitted], cells: list[Cell], gap: int = 1) -> str:
    """One row of a fitted table: each cell in its column's form, cut with '~' when still too long."""
    parts = []
    for f in fitted:
        value = printable(form_at(cells[f.index], f.level))  # escaped before it is cut: the columns stay aligned
        value = value if len(value) <= f.width else value[:f.width - 1] + "~"
        parts.append(value.ljust(f.width) if f.column.left else value.rjust(f.width))
    return (" " * gap).join(parts)


# -- charts: bars, columns, a burn-up, a week, a heatmap, as plain lines of text (no colour: the glyphs and the
# scale written on each chart tell everything). `unicode` is the locale's (utf8_locale): block elements in eighths
# of a cell where the terminal has them, whole cells of ASCII where it has not.

EIGHTHS = " ▏▎▍▌▋▊▉█"   # a horizontal bar's last cell, by eighths
RISING = " ▁▂▃▄▅▆▇█"    # a column's top cell, by eighths
SHADES = {True: " ░▒▓█", False: " .:*#"}  # a heatmap's cells: none, then a quarter of the largest each


def joined_to_fit(parts: list[str | tuple[str, ...]], width: int) -> str:
    """The first part, then each later one that still fits in `width`: a part is shown whole or not at all. A part
    given as forms from longest to shortest shows the longest form that fits."""
    text = parts[0] if isinstance(parts[0], str) else parts[0][0]
    for part in parts[1:]:
        text += next((form for form in ((part,) if isinstance(part, str) else part)
                      if len(text) + len(form) <= width), "")
    return text


def utf8_locale() -> bool:
    """Whether the user's locale (LC_ALL, LC_CTYPE, LANG) writes UTF-8, so charts may draw Unicode: the C library's
    codeset, not Python's (UTF-8 mode makes Python say UTF-8 in the C locale). Sets the C library's locale from the
    environment, as curses needs before it starts; a locale the system does not have is not UTF-8."""
    import locale
    try:
        locale.setlocale(locale.LC_ALL, "")
    except locale.Error:
        return False
    return "utf" in locale.nl_langinfo(locale.CODESET).lower().replace("-", "")


def steps_per_cell(unicode: bool) -> int:
    return 8 if unicode else 1


def bar_steps(value: float, largest: float, cells: int, steps: int) -> int:
    """A bar's length in steps (`steps` to a cell): value / largest × cells, rounded to the nearest step (halves
    up, exactly: costs and counts are integers, percents their float); none for zero, at least one for any other
    value, so that what is not zero never looks it; never past the chart."""
    if value <= 0 or largest <= 0:
        return 0
    exact = fractions.Fraction(value) * cells * steps / fractions.Fraction(largest)
    return min(cells * steps, max(1, half_up(exact.numerator, exact.denominator)))


def hbar(value: float, largest: float, width: int, unicode: bool) -> str:
    """A horizontal bar `width` cells long for the largest value, in eighths of a cell (whole '#' in ASCII);
    '' for zero. Not padded."""
    steps = bar_steps(value, largest, width, steps_per_cell(unicode))
    if not unicode:
        return "#" * steps
    return "█" * (steps // 8) + (EIGHTHS[steps % 8] if steps % 8 else "")


def column_rows(heights: list[int], rows: int, unicode: bool) -> list[str]:
    """Columns `heights` steps high (bar_steps), as `rows` lines of text, top first: the top cell of each in
    eighths (RISING), whole '#' in ASCII."""
    k = steps_per_cell(unicode)
    lines = []
    for row in range(rows):
        below = (rows - 1 - row) * k  # the steps under this row
        levels = [min(k, max(0, height - below)) for height in heights]
        lines.append("".join(RISING[level] if unicode else "#" if level else " " for level in levels))
    return lines


def local_hours(start_ms: int, end_ms: int, zone: ZoneInfo) -> list[tuple[int, dt.datetime]]:
    """The local whole hours in [start, end): every zone's offset is a multiple of 15 minutes."""
    first = -(-start_ms // BUCKET_MS) * BUCKET_MS
    moments = ((ms, dt.datetime.fromtimestamp(ms / 1000, zone)) for ms in range(first, end_ms, BUCKET_MS))
    return [(ms, moment) for ms, moment in moments if moment.minute == 0]


# The time axis's labels, densest first: the first whose labels all stand apart is drawn.
TIME_TICKS: tuple[tuple[Callable[[dt.datetime], bool], str, int], ...] = (  # which hours, how shown, longest span
    *((lambda d, k=k: d.hour % k == 0, "%H:%M", 2 * DAY_MS) for k in (1, 2, 3, 4, 6, 12)),
    (lambda d: d.hour == 0, "%a %d", 62 * DAY_MS),
    (lambda d: d.hour == 0, "%a", 62 * DAY_MS),
    (lambda d: d.hour == 0 and d.weekday() == 0, "%m-%d", 366 * DAY_MS),  # no year: within one year's span
    (lambda d: d.hour == 0 and d.day == 1, "%b", 366 * DAY_MS),
    (lambda d: d.hour == 0 and d.day == 1 and d.month % 3 == 1, "%b %Y", sys.maxsize),
    (lambda d: d.hour == 0 and d.day == 1 and d.month == 1, "%Y", sys.maxsize))


def time_axis(start_ms: int, end_ms: int, cells: int, zone: ZoneInfo) -> str:
    """Labels for a time axis `cells` wide from start to end, each starting at the cell of its moment, a space
    apart at least; the densest ticks that leave them so (TIME_TICKS); '' when none fit."""
    hours = local_hours(start_ms, end_ms, zone)
    for keep, fmt, longest in TIME_TICKS:
        if end_ms - start_ms > longest:
            continue
        ticks = [((ms - start_ms) * cells // (end_ms - start_ms), moment.strftime(fmt))
                 for ms, moment in hours if keep(moment)]
        ticks = [(cell, label) for cell, label in ticks if cell + len(label) <= cells]
        if ticks and all(cell + len(label) < after for (cell, label), (after, _) in zip(ticks, ticks[1:])):
            line = ""
            for cell, label in ticks:
                line += " " * (cell - len(line)) + label
            return line
    return ""


def framed(plot: list[str], labels: dict[int, str], axis: str, times: str, unicode: bool) -> list[str]:
    """Plot rows (top first) on a frame: the scale's labels right-aligned before the side at their rows
    (len(plot): the axis's row), the axis under the plot, the time labels under it."""
    label_width = max(map(len, labels.values()))
    side, corner = ("│", "└") if unicode else ("|", "+")
    lines = [f"{labels.get(row, '').rjust(label_width)} {side}{cells}" for row, cells in enumerate(plot)]
    lines.append(f"{labels.get(len(plot), '').rjust(label_width)} {corner}{axis}")
    lines.append(" " * (label_width + 2) + times)
    return [line.rstrip() for line in lines]


def axis_line(unicode: bool) -> str:
    return "─" if unicode else "-"


def scale_width(labels: Iterable[str]) -> int:
    """What the frame takes from a chart's width: its longest scale label, a space and the side."""
    return max(map(len, labels)) + 2


def time_chart(points: Iterable[tuple[int, float]], start_ms: int, end_ms: int, bucket_ms: int, width: int,
               height: int, unicode: bool, zone: ZoneInfo, format_value: Callable[[float], str]) -> list[str]:
    """Usage per bucket (an hour) from start to end as columns, `width` × `height` at most: a caption saying
    what a column holds, the columns (several cells wide each when there is room, several buckets each when
    there is not), the scale (the largest column's value at the top, 0 at the axis) and the time axis. Columns
    rather than braille: a bucket's total is an area, and a cell's eighths are twice braille's four dots up.
    [] when it cannot be drawn that small."""
    buckets = -(-(end_ms - start_ms) // bucket_ms)
    values = [0] * max(0, buckets)
    for ms, value in points:
        if start_ms <= ms < end_ms:
            values[(ms - start_ms) // bucket_ms] += value
    rows = height - 3  # the caption, the axis and its labels
    label = "0"
    while True:  # the scale's label takes width from the columns, which may hold more buckets each and sum higher
        cells = width - scale_width([label])
        if rows < 1 or cells < 8 or buckets < 1:
            return []
        group = -(-buckets // cells)  # buckets a column holds
        columns = [sum(values[i:i + group]) for i in range(0, buckets, group)]
        if len(format_value(max(columns))) <= len(label):
            break
        label = format_value(max(columns))
    # every column as wide as the others (an area's width says nothing): what is left, less than a cell for
    # each column, stays blank at the right
    cell_width = max(1, cells // len(columns))
    top = max(columns)
    heights = column_rows([bar_steps(value, top, rows, steps_per_cell(unicode)) for value in columns], rows, unicode)
    gap = 1 if cell_width >= 3 else 0  # columns stand apart when wide enough to spare it
    plot = ["".join(c * (cell_width - gap) + " " * gap for c in row) for row in heights]
    span = group * bucket_ms
    holds = format_duration(span) if span % HOUR_MS else plural(span // HOUR_MS, "hour")
    caption = joined_to_fit(["", (f"each column: {holds}", holds)], width)
    times = time_axis(start_ms, start_ms + len(columns) * span, len(columns) * cell_width, zone)
    return [caption] + framed(plot, {0: format_value(top), rows: "0"}, axis_line(unicode) * len(plot[0]),
                                      times, unicode)


def slices(start_ms: int, end_ms: int, cells: int) -> list[tuple[int, int]]:
    """[start, end) cut in `cells` equal slices, one for each cell of a chart, as [begin, end) of each."""
    bounds = [start_ms + (end_ms - start_ms) * i // cells for i in range(cells + 1)]
    return list(zip(bounds, bounds[1:]))


def burnup_chart(start_ms: int, end_ms: int, points: Iterable[tuple[int, float]], limit: float | None,
                 projected: float | None, now: int, width: int, height: int, unicode: bool, zone: ZoneInfo,
                 format_value: Callable[[float], str], limit_name: str = "limit") -> list[str]:
    """A 5-hour window from start to end (its reset): the cumulative usage so far as columns (`points`, oldest
    first, each the running total at its moment), the projection from now to `projected` at the reset, the limit
    as a line; scaled to the largest of them (higher where the limit would share the top row: it keeps a row and
    a label of its own), with the limit's value at its row, the time axis and a legend (in short forms to fit).
    `width` × `height` at most; [] when it cannot be drawn that small. The legend calls the limit `limit_name`
    (what it is: the plan's guess is not a measured limit)."""
    points = sorted(points)
    so_far = points[-1][1] if points else 0
    top = max(max((value for _, value in points), default=0), limit or 0, projected or 0)
    rows, k = height - 3, steps_per_cell(unicode)  # the axis, its labels, the legend
    if limit and format_value(limit) != format_value(top) and rows >= 2 and \
            bar_steps(limit, top, rows, k) > (rows - 1) * k:
        top = -(-limit * rows // (rows - 1))  # the limit would share the top row and its label: a row of its own
    labels = [format_value(top), "0"] + ([format_value(limit)] if limit else [])
    cells = width - scale_width(labels)
    if rows < 2 or cells < 4 or top <= 0 or end_ms <= start_ms:
        return []
    used = [bar_steps(max([v for ms, v in points if ms < min(end, now + 1)], default=0), top, rows, k)
            if begin <= now else 0 for begin, end in slices(start_ms, end_ms, cells)]
    plot = [list(row) for row in column_rows(used, rows, unicode)]

    def row_of(value: float) -> int:
        return rows - 1 - (max(1, bar_steps(value, top, rows, k)) - 1) // k

    line, dot = axis_line(unicode), "·" if unicode else "."
    marks = [(f"{'█' if unicode else '#'} used {format_value(so_far)}",)]  # each part long, then short
    if limit:
        marks.append((f"  {line} {limit_name} {format_value(limit)}", f" {line} {format_value(limit)}"))
        for cell in range(cells):
            if plot[row_of(limit)][cell] == " ":
                plot[row_of(limit)][cell] = line
    if projected is not None and now < end_ms:
        marks.append((f"  {dot} projected {format_value(projected)}", f" {dot} {format_value(projected)}"))
        for i, (_, end) in enumerate(slices(start_ms, end_ms, cells)):
            if end > now:
                value = so_far + (projected - so_far) * (end - now) / (end_ms - now)
                if plot[row_of(value)][i] in (" ", line):
                    plot[row_of(value)][i] = dot
    scale = {0: format_value(top), rows: "0"}
    if limit and row_of(limit) not in scale:
        scale[row_of(limit)] = format_value(limit)
    # every part long, else every part short (each glyph keeps its figure), else the parts that fit
    legend = next((text for text in ("".join(part[0] for part in marks), "".join(part[-1] for part in marks))
                   if len(text) <= width), joined_to_fit(["", *marks], width))
    return framed(["".join(row) for row in plot], scale, line * cells, time_axis(start_ms, end_ms, cells, zone),
                  unicode) + [legend]


LIMIT_RESETS = {"seven_day": ("Claude's weekly limit reset", "reset"),
                "five_hour": ("Claude's 5-hour limit reset", "reset")}  # a chart's legend, long and short


def week_chart(start_ms: int, end_ms: int, readings: Iterable[LimitReading], daily: Iterable[tuple[int, float]],
               width: int, height: int, unicode: bool, zone: ZoneInfo,
               format_value: Callable[[float], str], window: str = "seven_day") -> list[str]:
    """A week from start to end against Claude's weekly limit: Claude's weekly % readings as columns over the week
    (each the newest reading by then, 0 once its window has reset, none past the last reading; 100% at the top),
    each reset marked on the axis; then a bar for each day's usage (`daily`: (the day's start, its value)),
    scaled to the largest day, with its value. The days step aside when the height has no room for both, or
    when `daily` is empty; [] when not even the readings fit. `window` "five_hour" draws the 5-hour readings."""
    readings = sorted((r for r in readings if getattr(r, window) is not None), key=lambda r: r.read_ms)
    days = []
    day = dt.datetime.fromtimestamp(start_ms / 1000, zone)
    while ms_from_datetime(day) < end_ms:
        days.append(day)
        day = dt.datetime.combine(day.date() + dt.timedelta(days=1), dt.time(), zone)
    per_day = {}
    for ms, value in daily:
        date = dt.datetime.fromtimestamp(ms / 1000, zone).date()
        per_day[date] = per_day.get(date, 0) + value
    resets = sorted({getattr(r, window).resets_ms for r in readings
                     if start_ms < getattr(r, window).resets_ms < end_ms})
    mark = "▲" if unicode else "^"
    legend = [joined_to_fit(["", tuple(f"{mark} {name}" for name in LIMIT_RESETS[window])], width)] if resets else []
    values = [per_day.get(day.date(), 0) for day in days]
    names, figures = [f"{day:%a %m-%d}" for day in days], [format_value(value) for value in values]
    bar_width = width - max(map(len, names), default=0) - max(map(len, figures), default=0) - 2
    # the days under the readings when there is room for both, at least two rows of readings
    with_days = bool(per_day) and bar_width >= 4 and height - len(days) >= 2 + 2 + len(legend)
    rows = height - len(days) * with_days - 2 - len(legend)
    cells = width - scale_width(["100%", "0%"])
    if rows < 2 or cells < 4 or end_ms <= start_ms:
        return []
    k = steps_per_cell(unicode)
    heights = []
    for begin, end in slices(start_ms, end_ms, cells):
        latest = [r for r in readings if r.read_ms < end]
        live = latest and begin <= readings[-1].read_ms and getattr(latest[-1], window).resets_ms > begin
        heights.append(bar_steps(getattr(latest[-1], window).percent, 100, rows, k) if live else 0)
    axis = [axis_line(unicode)] * cells
    for reset in resets:
        axis[(reset - start_ms) * cells // (end_ms - start_ms)] = mark
    lines = framed(column_rows(heights, rows, unicode), {0: "100%", rows: "0%"}, "".join(axis),
                   time_axis(start_ms, end_ms, cells, zone), unicode) + legend
    if not with_days:
        return lines
    return lines + [f"{name} {hbar(value, max(values), bar_width, unicode).ljust(bar_width)} {figure}"
                    for name, value, figure in zip(names, values, figures)]


def heatmap(points: Iterable[tuple[int, float]], width: int, unicode: bool, zone: ZoneInfo,
            format_value: Callable[[float], str]) -> list[str]:
    """Usage by day of the week (rows, Monday first) and local hour of the day (columns), summed over every
    point: each cell shaded by its quarter of the busiest cell (SHADES: none for zero, the lightest for any
    other value up to a quarter), with the hours above and a legend with the busiest cell's value below;
    cells 1 to 3 columns wide as `width` allows; [] under 28 columns."""
    sums = [[0.0] * 24 for _ in range(7)]
    for ms, value in points:
        moment = dt.datetime.fromtimestamp(ms / 1000, zone)
        sums[moment.weekday()][moment.hour] += value
    cell = min(3, (width - 4) // 24)
    if cell < 1:
        return []
    top = max(map(max, sums))
    shades = SHADES[unicode]

    def shade(value: float) -> str:
        return shades[0 if value <= 0 else -(-fractions.Fraction(value) * 4 // fractions.Fraction(top))]

    step = 3 if cell == 1 else 2 if cell == 2 else 1  # hours between labels
    hours = "".join(f"{hour:<{cell * step}}" for hour in range(0, 24, step)).rstrip()
    lines = ["    " + hours] + [f"{calendar.day_abbr[day]} " + "".join(shade(v) * cell for v in sums[day])
                                 for day in range(7)]
    legend = (f"{shades[1]} up to 25%, {shades[2]} 50%, {shades[3]} 75%, {shades[4]} 100% of the busiest hour "
              f"({format_value(top)}); blank: none")
    return [line.rstrip() for line in lines] + textwrap.wrap(legend, width)


# ---------------------------------------------------------------- Quick query: --format and --json for status bars

PLAN_MONTHLY_USD = {"pro": 20, "max": 100, "max20": 200}
FORMAT_VARIABLES = ("daily_cost", "monthly_cost", "daily_plan_usage", "monthly_plan_usage", "daily_tokens",
                    "monthly_tokens", "block_usage", "block_remaining", "block_projection", "weekly_usage",
                    "session_cost", "five_hour", "five_hour_resets", "seven_day", "seven_day_resets")
BLOCK_VARIABLES = {"block_usage", "block_remaining", "block_projection"}
CLAUDE_VARIABLES = {"five_hour", "five_hour_resets", "seven_day", "seven_day_resets"}  # as `ccmon statusline` has
FORMAT_PATTERN = re.compile("@(" + "|".join(sorted(FORMAT_VARIABLES, key=len, reverse=True)) + ")")


@dataclasses.dataclass(frozen=True)
class QuickFigures:
    """What --format and --json report; None where it was not asked for."""
    plan: str
    days_in_month: int
    daily: Usage | None = None
    monthly: Usage | None = None
    block: BlockStatus | None = None
    block_tracked: bool = False          # -b given: block figures are null, not missing, between blocks
    weekly: Usage | None = None          # premium usage of the rolling week
    weekly_limit: int | None = None
    session_id: str = ""
    session: Usage | None = None
    claude: ClaudeLimits | None = None   # Claude's own limits, when asked for
    now_ms: int = 0
    zone: ZoneInfo | None = None


def day_and_month_start(now: int, zone: ZoneInfo) -> tuple[int, int, int]:
    """Local midnight today, local midnight on the 1st, and the month's length in days."""
    today = dt.datetime.fromtimestamp(now / 1000, zone).date()
    midnight = ms_from_datetime(dt.datetime.combine(today, dt.time(), zone))
    first = ms_from_datetime(dt.datetime.combine(today.replace(day=1), dt.time(), zone))
    return midnight, first, calendar.monthrange(today.year, today.month)[1]


def fetch_quick_figures(client: Client, config: Config, now: int, wanted: set[str], agent: str | None = None,
                        account: str | None = None, of_session: bool = False) -> QuickFigures:
    """One RPC per figure the template uses, so a status bar pays only for what it shows; the usage figures of one
    agent's with `agent`; Claude's windows, the block and the week of the user `account`, else as GetLimits answers
    for everyone. With `of_session` (a status line's), `account` is its session's user, None until the session's
    telemetry has come: then one user's account, which GetLimits answers on a team's server, is not known to be
    the session's, and its figures are left out (Claude's limits are one account's), as are everyone's there."""
    def not_known_to_be_its(claude: ClaudeLimits) -> bool:  # a status line's: see of_session
        return of_session and account is None and (claude.user is not None or claude.team)

    midnight, month_start, days = day_and_month_start(now, config.zone)
    figures = QuickFigures(config.plan, days)
    if wanted & {"daily_cost", "daily_plan_usage", "daily_tokens"}:
        figures = dataclasses.replace(figures, daily=client.stats(midnight, now, agent=agent).total)
    if wanted & {"monthly_cost", "monthly_plan_usage", "monthly_tokens"}:
        figures = dataclasses.replace(figures, monthly=client.stats(month_start, now, agent=agent).total)
    settings = MonitorSettings.from_config(config)
    claude = None
    if wanted & BLOCK_VARIABLES and settings.block_mode is not None or "weekly_usage" in wanted:
        limits = limit_figures(client, LimitQuery(settings.block_mode, now, settings.learn, settings.limit),
                               config.zone, account)
        claude = limits.claude
        figures = dataclasses.replace(figures, block_tracked=settings.block_mode is not None)
        if not not_known_to_be_its(limits.claude):
            figures = dataclasses.replace(figures, block=block_status(limits, now), weekly=weekly_premium(limits),
                                          weekly_limit=weekly_limit_in_force(limits, settings.weekly_limit).tokens)
    if wanted & CLAUDE_VARIABLES:
        limits = claude or client.limits(account, now)
        if not_known_to_be_its(limits):
            limits = ClaudeLimits()
        if agent not in (None, CLAUDE_CODE):  # that agent's own plan's windows (Codex's), where Claude's would be
            own = next((reading for reading in limits.agents if reading.agent == agent), None)
            limits = ClaudeLimits(own, own)
        figures = dataclasses.replace(figures, claude=limits, now_ms=now, zone=config.zone)
    if "session_cost" in wanted:
        latest = client.latest_session() if agent is None else next(  # the agent's newest session of the month
            (SessionUsage(s.session_id, s.split) for s in client.sessions(month_start, now, limit=1, agent=agent)),
            SessionUsage("", Split()))
        figures = dataclasses.replace(figures, session_id=latest.session_id, session=latest.split.total)
    return figures


def plan_usage_percent(cost_nanos: int, plan: str, days: int | None = None) -> float:
    """Cost as a percentage of the plan's monthly price (or of a day's share of it)."""
    price = PLAN_MONTHLY_USD.get(plan)
    if not price:
        return 0.0
    return cost_nanos * 100 * (days or 1) / (price * NANOS_PER_USD)  # one division of exact integers


def quick_values(figures: QuickFigures) -> dict[str, Any]:
    """Figures as numbers, for --json (and, formatted, for --format)."""
    values: dict[str, Any] = {}
    if figures.daily is not None:
        values.update(daily_cost=figures.daily.cost_usd, daily_tokens=figures.daily.total,
                      daily_plan_usage=plan_usage_percent(figures.daily.cost_nanos, figures.plan,
                                                          figures.days_in_month))
    if figures.monthly is not None:
        values.update(monthly_cost=figures.monthly.cost_usd, monthly_tokens=figures.monthly.total,
                      monthly_plan_usage=plan_usage_percent(figures.monthly.cost_nanos, figures.plan))
    if figures.block_tracked:
        values.update(dict.fromkeys(("block_usage", "block_tokens", "block_limit", "block_remaining", "block_end",
                                     "block_projection")))
    if figures.block is not None:
        block = figures.block
        values.update(block_usage=block.percent, block_tokens=block.used, block_limit=block.limit,
                      block_remaining=block.remaining_ms // 1000, block_end=block.end_ms // 1000,
                      block_projection=block.projected_at_end() / block.limit * 100 if block.limit else None)
    if figures.weekly is not None:
        values.update(weekly_premium_tokens=figures.weekly.limited, weekly_premium_cost=figures.weekly.cost_usd,
                      weekly_usage=figures.weekly.limited / figures.weekly_limit * 100 if figures.weekly_limit
                      else None)
    if figures.session is not None:
        values.update(session_id=figures.session_id, session_cost=figures.session.cost_usd)
    if figures.claude is not None:  # Claude's own figures as last read, while their window has not reset
        windows = {name: figures.claude.window(name, figures.now_ms) for name in ("five_hour", "seven_day")}
        for name, window in windows.items():
            values[f"{name}_percent"] = window.percent if window else None
            values[f"{name}_resets_at"] = window.resets_ms // 1000 if window else None
        read = [figures.claude.read_ms(name) for name, window in windows.items() if window]
        values["limits_read_at"] = min(read) // 1000 if read else None
    return values


def format_quick(template: str, figures: QuickFigures) -> str:
    """Replace @variables (longest name first); unknown @words stay as they are."""
    values = quick_values(figures)
    shown = {
        "daily_cost": lambda: format_cost(figures.daily.cost_nanos),
        "monthly_cost": lambda: format_cost(figures.monthly.cost_nanos),
        "daily_plan_usage": lambda: format_percent(values['daily_plan_usage']),
        "monthly_plan_usage": lambda: format_percent(values['monthly_plan_usage']),
        "daily_tokens": lambda: format_count(figures.daily.total),
        "monthly_tokens": lambda: format_count(figures.monthly.total),
        "block_usage": lambda: percent_or_dash(values.get("block_usage")),
        "block_remaining": lambda: format_duration(figures.block.remaining_ms) if figures.block else "-",
        "block_projection": lambda: percent_or_dash(values.get("block_projection")),
        "weekly_usage": lambda: percent_or_dash(values.get("weekly_usage")),  # a share of the weekly limit, if set
        "session_cost": lambda: format_cost(figures.session.cost_nanos),
        "five_hour": lambda: percent_or_dash(values["five_hour_percent"]),
        "five_hour_resets": lambda: reset_or_dash(values["five_hour_resets_at"], figures),
        "seven_day": lambda: percent_or_dash(values["seven_day_percent"]),
        "seven_day_resets": lambda: reset_or_dash(values["seven_day_resets_at"], figures),
    }
    return FORMAT_PATTERN.sub(lambda match: shown[match.group(1)](), template)


def percent_or_dash(value: float | None) -> str:
    return "-" if value is None else format_percent(value)


def reset_or_dash(resets_s: int | None, figures: QuickFigures) -> str:
    return "-" if resets_s is None else reset_time(resets_s * 1000, figures.now_ms, figures.zone or ZoneInfo("UTC"))


# The quick route. Claude Code runs the status line after every turn, and a status bar runs --format every few
# seconds; loading ccmon (its module, gRPC and protobuf) takes most of their time. So the server also renders both,
# at STATUS_LINE_PAGE and QUICK_QUERY_PAGE, and a full run of either from ccmon.pyz writes down how to ask it: its
# bootstrap then sends the request there and prints the answer without unpacking or importing anything of ccmon's.
# A route holds while the command's words, the CCMON_ variables, HOME, the config files (and for --format, which
# reads ./config.*, the current folder) are what they were; any failure falls back to the full run.
ROUTES_KEPT = 16  # commands (statusline, --format with different words) remembered


def file_stamp(path: Path) -> list[int] | None:
    """[mtime in ns, size] of a file, None when absent: what tells that it changed (read the same way by the
    bootstrap)."""
    try:
        info = path.stat()
    except OSError:
        return None
    return [info.st_mtime_ns, info.st_size]


def page_answers(url: str, config: Config, wait_s: float) -> bool:
    """Whether `url` is one of ccmon's JSON pages, reached as the server's port was named (not remapped by a
    container or a proxy, not another service's): an empty request, with the token, gets its 400 in JSON."""
    parts, connection = urlsplit(url), None
    try:
        if parts.scheme == "https":
            tls = config.monitor_tls
            context = ssl.create_default_context(cafile=tls.ca)
            if tls.cert:
                context.load_cert_chain(tls.cert, tls.key)
            connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=wait_s, context=context)
            connection.sock = context.wrap_socket(socket.create_connection((parts.hostname, parts.port), wait_s),
                                                  server_hostname=tls.server_name or parts.hostname)
        else:
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=wait_s)
        headers = {"Content-Type": JSON, **({"Authorization": f"Bearer {config.monitor_token}"}
                                            if config.monitor_token else {})}
        connection.request("POST", parts.path, b"{}", headers)
        response = connection.getresponse()
        answer = json.loads(response.read(PAGE_MAX_BODY))
        return response.status == 400 and isinstance(answer, dict) and "error" in answer
    except (OSError, ValueError, RecursionError, http.client.HTTPException):
        return False
    finally:
        if connection is not None:
            connection.close()


def route_folder(explicit: str | None, search_cwd: bool) -> str | None:
    """The folder a route depends on: the current one, when the configuration is looked for there or named from
    there (a relative --config); None when it is not."""
    if explicit:
        return None if Path(explicit).expanduser().is_absolute() else str(Path.cwd())
    return str(Path.cwd()) if search_cwd else None


def route_environment(environ: dict[str, str]) -> dict[str, str]:
    """The variables a configuration is read from (compared the same way by the bootstrap)."""
    return {name: value for name, value in environ.items() if name.startswith("CCMON_") or name == "HOME"}


@dataclasses.dataclass(frozen=True)
class QuickRoute:
    """Where the quick routes are written (quick-routes.json in the cache folder of ccmon.pyz's build), this
    command's words after the program, the config files its configuration was looked for in, and the folder that
    was looked in (None: none was)."""
    file: Path
    words: tuple[str, ...]
    config_files: tuple[Path, ...]
    folder: str | None = None

    def remember(self, config: Config, client: Client, page: str | None, body: dict, wait_s: float,
                 stdin_wait_s: float | None = None) -> None:
        """Write the route: POST `body` to the `page` of the server `client` asks (with the status line input read
        from stdin within `stdin_wait_s`, when given), once that page is seen to answer as ccmon's does. No page,
        or a server without the pages, drops it. Never fails the command: a route not written only costs the next
        run its speed."""
        key, entry = json.dumps(list(self.words)), None
        if CONTROL_CHARACTERS.search(body.get("template", "")):
            page = None  # colours of its own: the bootstrap escapes what a server sends, so the full run prints it
        try:
            http_port = client.server_info().quick_route_http_port if page else 0
        except ServerUnreachable:
            return  # the route may be right still: left as it is
        if http_port:
            tls, host = config.monitor_tls, parse_address(config.monitor_server, fail_as=ConfigError)[0]
            entry = {"env": route_environment(dict(os.environ)), "folder": self.folder,
                     "files": {str(path.absolute()): file_stamp(path) for path in self.config_files},
                     "url": f"{'https' if tls else 'http'}://{host}:{http_port}{page}",
                     "token": config.monitor_token,
                     "tls": tls and {"ca": tls.ca and str(tls.ca), "cert": tls.cert and str(tls.cert),
                                     "key": tls.key and str(tls.key), "server_name": tls.server_name},
                     "wait_s": wait_s, "stdin_wait_s": stdin_wait_s, "stdin_max": MAX_VALUE_CHARS,
                     "stdin_limit": PAGE_MAX_BODY // 2, "body": body}
        try:
            routes = json.loads(self.file.read_text())
        except (OSError, ValueError):
            routes = {}
        routes = routes if isinstance(routes, dict) else {}
        if routes.get(key) == entry:
            return
        routes.pop(key, None)
        if entry and page_answers(entry["url"], config, wait_s):
            routes[key] = entry
        try:  # readable by its user only: it holds the token
            write_atomically(self.file, json.dumps(dict(list(routes.items())[-ROUTES_KEPT:])).encode(), 0o600)
        except OSError as exc:
            log.debug("the quick route is not written: %s", exc)


def quick_query_plan(config: Config, template: str | None, as_json: bool,
                     agent: str | None) -> tuple[set[str], set[str], str]:
    """What a quick query fetches, what it withholds from --json, and a warning to print ('' for none); a
    ConfigError for what it cannot answer."""
    wanted = set(FORMAT_VARIABLES) if as_json else set(FORMAT_PATTERN.findall(template or ""))
    plans = {"daily_plan_usage", "monthly_plan_usage"}
    withheld = plans if agent not in (None, CLAUDE_CODE) else set()  # of another agent's cost: not Claude's plan's
    if agent not in (None, CLAUDE_CODE):  # blocks and plan are Claude Code's, whatever the filter; the 5-hour and
        claudes = sorted(wanted & (BLOCK_VARIABLES | {"weekly_usage"} | plans))  # weekly windows the agent's own
        if claudes and not as_json:
            raise ConfigError(f"--agent {agent}: {', '.join('@' + name for name in claudes)} are Claude's blocks and "
                              f"plan, of Claude Code's usage alone (leave them out, or use --agent {CLAUDE_CODE})")
        wanted -= set(claudes)
    if config.block_mode is None and wanted & BLOCK_VARIABLES and not as_json:
        raise ConfigError("@block_usage, @block_remaining and @block_projection need -b/--block "
                          "(for example -b auto)")
    unknown = sorted(set(re.findall(r"@\w+", FORMAT_PATTERN.sub("", template or ""))))
    # left in the output as written; said so that a typo is found without dirtying a status bar
    warning = f"ccmon: unknown in --format, left as written: {' '.join(unknown)} (known: " \
              f"{' '.join('@' + name for name in FORMAT_VARIABLES)})" if unknown else ""
    return wanted, withheld, warning


QUICK_QUERY_WAIT_S = 3.0  # for the server's answer


def run_quick_query(config: Config, template: str | None, as_json: bool, agent: str | None = None,
                    route: QuickRoute | None = None) -> int:
    """--format or --json; with `route`, how ccmon.pyz may ask the server for the next --format directly is written
    down."""
    wanted, withheld, warning = quick_query_plan(config, template, as_json, agent)
    if warning:
        print(warning, file=sys.stderr)
    client = Client.for_config(config, timeout_s=QUICK_QUERY_WAIT_S)
    try:
        figures = fetch_quick_figures(client, config, now_ms(), wanted, agent)
        say_if_go_ccmon(client, quick_values(figures), config.monitor_server)
        if route is not None and not as_json:
            route.remember(config, client, QUICK_QUERY_PAGE, {"template": template or "", "agent": agent or "",
                                                              "settings": dict(config.figure_settings)},
                           QUICK_QUERY_WAIT_S)
    except ServerUnreachable as exc:
        print(f"ccmon: cannot reach the ccmon server at {config.monitor_server}: {printable(str(exc))}",
              file=sys.stderr)
        return 1
    finally:
        client.close()
    if as_json:
        values = {name: value for name, value in quick_values(figures).items() if name not in withheld}
        print(json_text({**values, **({"agent": agent} if agent else {})}, sort_keys=True))
    else:
        print(format_quick(template or "", figures))
    return 0


def quick_query_pages(service: QueryService, token: str) -> Pages:
    """POST QUICK_QUERY_PAGE: --format rendered by the server, for the quick route. The body is {"template": ...,
    "agent": ... or "", "settings": the client's figure_settings}; the answer {"line", "problem"}."""
    def quick_query_answer(asked: dict) -> PageAnswer:
        if not (isinstance(asked.get("template"), str) and isinstance(asked.get("agent"), str)
                and isinstance(asked.get("settings"), dict)):
            return json_answer(400, {"error": 'the body is a JSON object {"template": TEXT, "agent": TEXT, '
                                              '"settings": {KEY: VALUE}}'})
        agent = asked["agent"] or None
        if agent is not None and agent not in AGENTS:
            return json_answer(400, {"error": unknown_agent(agent)})
        try:
            config = figure_config(asked["settings"], "the quick query's settings")
            wanted, _, warning = quick_query_plan(config, asked["template"], False, agent)
            figures = fetch_quick_figures(ServiceClient(service), config, now_ms(), wanted, agent)
        except ConfigError as exc:
            return json_answer(400, {"error": str(exc)})
        except ServerUnreachable as exc:
            return json_answer(503, {"error": str(exc)})
        return json_answer(200, {"line": format_quick(asked["template"], figures), "problem": warning})
    return {QUICK_QUERY_PAGE: {"POST": json_page(token, quick_query_answer)}}


def say_if_go_ccmon(client: Client, values: dict[str, Any], address: str) -> None:
    """Zeros from the Go ccmon are not usage: say so, once (asking which server it is only when all is zero)."""
    if not any(values.get(name) for name in ("daily_cost", "monthly_cost", "daily_tokens", "monthly_tokens",
                                             "session_cost")):
        with contextlib.suppress(ServerUnreachable):
            if not client.server_info().version:
                print(f"ccmon: {address}: {GO_CCMON_ZEROS}", file=sys.stderr)


def run_health_check(config: Config) -> int:
    """Exit 0 when a ccmon server (this one or the Go one) answers; for Docker's HEALTHCHECK and service managers."""
    client = Client.for_config(config, timeout_s=3.0)
    try:
        info = client.server_info()
    except ServerUnreachable as exc:
        print(f"unhealthy: {config.monitor_server}: {printable(str(exc))}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if info.version:
        print(f"ok: ccmon {printable(info.version)} at {config.monitor_server}, {info.total_requests} requests stored")
    else:
        print(f"ok: {config.monitor_server}: {GO_CCMON_ONLY}; {GO_CCMON_ZEROS}")
    return 0


# ---------------------------------------------------------------- Status line: ccmon statusline, for Claude Code's settings

STATUS_VARIABLES = ("model", "context", "session_cost", "daily_cost", "five_hour", "five_hour_resets", "seven_day",
                    "seven_day_resets", "project")
STATUS_PATTERN = re.compile("@(" + "|".join(sorted(STATUS_VARIABLES, key=len, reverse=True)) + ")")
DEFAULT_STATUS_LINE = ("@model | ctx @context | session @session_cost | today @daily_cost | "
                       "5h @five_hour (resets @five_hour_resets) | week @seven_day (@seven_day_resets)")


def number_in(value: Any, low: float, high: float) -> float | None:
    """A JSON number within [low, high], else None: status line input is read, never trusted."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        return None  # compared before any conversion: a 400-digit integer is simply out of range
    return float(value)


def limit_window(data: Any, now: int) -> LimitWindow | None:
    """One window of status line input's rate_limits: used_percentage 0-100, resets_at in epoch seconds."""
    if not isinstance(data, dict):
        return None
    percent = number_in(data.get("used_percentage"), 0, 100)
    resets = number_in(data.get("resets_at"), 1, (now + READING_HORIZON_MS) / 1000)
    if percent is None or resets is None:
        return None
    period = data.get("period")
    return LimitWindow(percent, int(resets * 1000), number_in(data.get("used_usd"), 0, 1e9),
                       number_in(data.get("limit_usd"), 0, 1e9),
                       valid_text(period) if isinstance(period, str) else "")


def text_at(data: dict, *path: str) -> str:
    for key in path:
        data = data.get(key) if isinstance(data, dict) else None
    return valid_text(data.strip()) if isinstance(data, str) else ""


def reading_from_status_input(data: dict, now: int) -> LimitReading:
    """Claude Code's status line input (any key may be missing or odd) as a reading of this moment."""
    limits = data.get("rate_limits") if isinstance(data.get("rate_limits"), dict) else {}
    context = data.get("context_window") if isinstance(data.get("context_window"), dict) else {}
    return LimitReading(text_at(data, "session_id"), now,
                        text_at(data, "workspace", "project_dir") or text_at(data, "cwd"),
                        text_at(data, "model", "id"), number_in(context.get("used_percentage"), 0, 100),
                        limit_window(limits.get("five_hour"), now), limit_window(limits.get("seven_day"), now),
                        limit_window(limits.get("spend_limit"), now), text_at(data, "version"))


def status_values(data: dict, reading: LimitReading, session: Split | None, today: Split | None, zone: ZoneInfo,
                  now: int) -> dict[str, str]:
    """The status line's figures as text; a figure with nothing to show is absent, never zero."""
    values = {}
    if text_at(data, "model", "display_name") or reading.model:
        values["model"] = printable(text_at(data, "model", "display_name") or reading.model)
    if reading.context_percent is not None:
        values["context"] = format_percent(reading.context_percent)
    own_cost = number_in((data.get("cost") or {}).get("total_cost_usd") if isinstance(data.get("cost"), dict)
                         else None, 0, MAX_USD)
    session_nanos = round(own_cost * NANOS_PER_USD) if own_cost is not None else \
        session.total.cost_nanos if session is not None else 0  # Claude Code's own figure, up to this very turn
    if session_nanos:  # nothing yet at start-up: the session has made no request
        values["session_cost"] = format_cost(session_nanos)
    if today is not None:  # Claude Code's status line: Claude Code's cost today, not the other agents'
        values["daily_cost"] = format_cost(today.claude.cost_nanos)
    for name, window in (("five_hour", reading.five_hour), ("seven_day", reading.seven_day)):
        if window is not None and window.resets_ms > now:
            values[name] = format_percent(window.percent)
            values[f"{name}_resets"] = reset_time(window.resets_ms, now, zone)
    if reading.project:
        values["project"] = printable(Path(reading.project).name or reading.project)
    return values


def format_status_line(template: str, values: dict[str, str], unknown: re.Pattern | None = None) -> str:
    """The template with @variables replaced. Of a template in '|'-separated parts, a part with a figure that
    has nothing to show is left out; a single part shows '-' for it. So are the @variables `unknown` matches
    (--format's figures, without the server), which are otherwise left for format_quick."""
    parts = template.split("|")

    def filled(part: str) -> str | None:
        names = STATUS_PATTERN.findall(part)
        if len(parts) > 1 and any(name not in values for name in names):
            return None
        part = STATUS_PATTERN.sub(lambda match: values.get(match.group(1), "-"), part)
        if unknown is None or not unknown.search(part):
            return part
        return None if len(parts) > 1 else unknown.sub("-", part)

    kept = [part for part in map(filled, parts) if part is not None]
    return "|".join(kept).strip()


STATUS_INPUT_WAIT_S = 1.0  # for stdin to hold one whole JSON object: Claude Code writes it at once


def read_json_object(fd: int, wait_s: float, limit: int) -> tuple[str, bool]:
    """What arrives on `fd` until it holds one whole JSON object (stdin may be left open), it ends, `wait_s`
    passes or more than `limit` bytes have come: (the text, whether it was cut at the limit)."""
    deadline, received = time.monotonic() + wait_s, bytearray()
    while len(received) <= limit:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        received += chunk
        if received.rstrip().endswith(b"}"):  # perhaps the object's end: worth a parse
            try:
                json.JSONDecoder().raw_decode(received.decode("utf-8", "replace").lstrip())
                break
            except (ValueError, RecursionError):
                pass
    return received[:limit].decode("utf-8", "replace"), len(received) > limit


def read_status_input(stream, wait_s: float = STATUS_INPUT_WAIT_S) -> tuple[dict, str]:
    """(the status line input, a problem to report or ''): no stdin, a terminal or bad JSON gives {} and says so."""
    if stream is None or stream.isatty():
        return {}, "ccmon statusline reads Claude Code's status line JSON on stdin (see docs/statusline.md)"
    text, cut = read_json_object(stream.fileno(), wait_s, MAX_VALUE_CHARS)
    if cut:
        return {}, (f"ccmon statusline: stdin is larger than {MAX_VALUE_CHARS // 2**20} MB, more than a status line's "
                    "input; showing server figures only")
    return status_input_of(text)


def status_input_of(text: str) -> tuple[dict, str]:
    """The status line input read from its text, as read_status_input says."""
    try:
        data, _ = json.JSONDecoder().raw_decode(text.lstrip())
    except (ValueError, RecursionError):
        return {}, f"ccmon statusline: stdin is not JSON ({len(text)} characters); showing server figures only"
    if not isinstance(data, dict):
        return {}, "ccmon statusline: stdin is not a JSON object; showing server figures only"
    return data, ""


def run_status_line(config: Config | None, template: str | None, stream=sys.stdin,
                    route: QuickRoute | None = None) -> int:
    """Print one status line and report the reading, within Claude Code's patience; never blank, exit 0.
    Without a usable configuration (None) the line shows what stdin alone gives. With `route`, how ccmon.pyz may
    ask the server for the next one directly is written down."""
    now = now_ms()
    data, problem = read_status_input(stream)
    if problem:
        print(problem, file=sys.stderr)
    reading = reading_from_status_input(data, now)
    zone = config.zone if config else ZoneInfo("UTC")
    line = format_status_line(template or DEFAULT_STATUS_LINE, status_values(data, reading, None, None, zone, now),
                              FORMAT_PATTERN)  # without the server, its figures have nothing to show
    if config is not None:
        line = status_line_with_server(config, template, data, reading, now, route) or line
    print(status_line_text(line))
    return 0


def status_line_text(line: str) -> str:
    return line or "ccmon: nothing to show yet"


def status_line_with_server(config: Config, template: str | None, data: dict, reading: LimitReading,
                            now: int, route: QuickRoute | None = None) -> str | None:
    """The status line with the server's figures, the reading reported; None when the server did not answer."""
    client = Client.for_config(config, timeout_s=config.status_line_wait_s)
    try:
        line = status_line_from(client, config, template, data, reading, now)
        if route is not None:  # a template with quick query figures has none: they are the client's to work out
            template = template or DEFAULT_STATUS_LINE
            route.remember(config, client, None if needs_client_settings(template) else STATUS_LINE_PAGE,
                           {"template": template, "timezone": config.monitor_timezone}, config.status_line_wait_s,
                           STATUS_INPUT_WAIT_S)
        return line
    except ServerUnreachable as exc:
        log.debug("status line without the server's figures: %s", exc)
        return None
    finally:
        client.close()


def status_line_from(client: Client, config: Config, template: str | None, data: dict, reading: LimitReading,
                     now: int) -> str:
    """The status line with the figures of the server `client` asks (the reading reported to it)."""
    session = today = account = None
    if reading.session_id:
        told = client.report_status_line(reading, config.zone.key)
        session, today, account = told.session, told.today, told.user
    else:
        today = client.stats(day_bounds(config.zone, now, 1)[0][1], now)
    line = format_status_line(template or DEFAULT_STATUS_LINE,
                              status_values(data, reading, session, today, config.zone, now))
    wanted = set(FORMAT_PATTERN.findall(line))  # quick query figures, in a template that asks for them
    return format_quick(line, fetch_quick_figures(client, config, now, wanted, account=account, of_session=True)) \
        if wanted else line


def needs_client_settings(template: str) -> bool:
    """Whether a status line asks for quick query figures (blocks, plan shares): they are worked out from the
    client's own limit settings, so the server does not render them."""
    return bool(FORMAT_PATTERN.search(STATUS_PATTERN.sub("", template)))


def status_line_pages(config: Config, service: QueryService) -> Pages:
    """POST STATUS_LINE_PAGE: the status line rendered by the server, for the quick route. The body is
    {"input": the status line input's text, "template": ..., "timezone": ...}; the answer {"line", "problem"}."""
    def status_line_answer(asked: dict) -> PageAnswer:
        if not all(isinstance(asked.get(key), str) for key in ("input", "template", "timezone")):
            return json_answer(400, {"error": 'the body is a JSON object {"input": TEXT, "template": TEXT, '
                                              '"timezone": ZONE}'})
        template, zone = asked["template"] or DEFAULT_STATUS_LINE, zone_or_none(asked["timezone"])
        if zone is None:
            return json_answer(400, {"error": f"unknown timezone {asked['timezone'][:100]!r}"})
        if needs_client_settings(template):
            return json_answer(400, {"error": "the template asks for quick query figures, which only the client "
                                              "works out (from its own limit settings)"})
        data, problem = status_input_of(asked["input"])
        now = now_ms()
        try:
            line = status_line_from(ServiceClient(service), dataclasses.replace(config, monitor_timezone=zone.key),
                                    template, data, reading_from_status_input(data, now), now)
        except ServerUnreachable as exc:
            return json_answer(503, {"error": str(exc)})
        return json_answer(200, {"line": status_line_text(line), "problem": problem})
    return {STATUS_LINE_PAGE: {"POST": json_page(config.server_token, status_line_answer)}}


# ---------------------------------------------------------------- Reports: ccmon report daily|weekly|monthly|session|model|blocks|project|limits

REPORT_KINDS = ("daily", "weekly", "monthly", "session", "model", "blocks", "project", "agent", "limits")
REPORT_WIDTH = 120  # a table's width unless --wide
USAGE_FIELDS = ("requests", "input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens",
                "total_tokens", "cost_usd")


LIMIT_FIELDS = ("limits", "read_at", "user", "session_id", "five_hour_percent", "five_hour_resets",
                "seven_day_percent", "seven_day_resets")


def usage_fields(usage: Usage) -> dict[str, Any]:
    return dict(zip(USAGE_FIELDS, (usage.requests, usage.input, usage.output, usage.cache_read, usage.cache_creation,
                                   usage.total, usage.cost_nanos / NANOS_PER_USD)))


def parse_day(text: str | None, flag: str) -> dt.date | None:
    if text is None:
        return None
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{flag}: invalid date {text!r} (use YYYY-MM-DD)") from None


def report_period(kind: str, since: dt.date | None, until: dt.date | None, zone: ZoneInfo,
                  now: int) -> tuple[int, int]:
    """[start, end) in ms: local midnight of `since` (by default 30 days, 12 weeks or 12 months back) to the
    midnight after `until` (by default now)."""
    today = dt.datetime.fromtimestamp(now / 1000, zone).date()
    try:
        if since is None:
            last = until or today
            months_back = last.year * 12 + last.month - 1 - 11
            since = {"weekly": last - dt.timedelta(days=last.weekday() + 77),
                     "monthly": dt.date(months_back // 12, months_back % 12 + 1, 1)}.get(kind,
                                                                                        last - dt.timedelta(days=29))
        if until is not None and until < since:
            raise ConfigError(f"--until {until} is before --since {since}")
        start = ms_from_datetime(dt.datetime.combine(since, dt.time(), zone))
        end = ms_from_datetime(dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), zone)) if until else now
    except (OverflowError, ValueError):  # the first or last days a date can be have no day before or after
        raise ConfigError(f"--since/--until: dates from 0001-01-31 to 9999-12-30, please (got {since} to "
                          f"{until})") from None
    return start, end


def project_row(project: str, sessions: int, split: Split) -> dict[str, Any]:
    return {"project": project, "sessions": sessions, **usage_fields(split.total),
            "premium_requests": split.premium.requests, "premium_cost_usd": split.premium.cost_nanos / NANOS_PER_USD}


def agent_rows(client: Client, start: int, end: int, user: str | None, project: str | None) -> list[dict[str, Any]]:
    """`ccmon report agent`: each agent's usage in the period, by cost, with how many of its models were used."""
    rows = [{"agent": one.agent, "models": one.models, **usage_fields(one.usage)}
            for one in usage_of_agents(client.models(start, end, user, project))]
    return sorted(rows, key=lambda row: (-row["cost_usd"], row["agent"]))  # a report's ties by name


def check_report_agent(kind: str, agent: str | None, chart: str | None) -> None:
    if agent not in (None, CLAUDE_CODE) and kind == "blocks":
        raise ConfigError(f"--agent {agent}: blocks are Claude's 5-hour windows, Claude Code's usage alone "
                          f"(use --agent {CLAUDE_CODE}, or the daily report)")
    if agent not in (None, CLAUDE_CODE) and kind == "limits" and chart:
        raise ConfigError(f"--chart: the limits report charts Claude's own limits, not {agent}'s plan's (leave out "
                          "--chart or --agent)")


def report_rows(client: Client, kind: str, start: int, end: int, zone: ZoneInfo,
                user: str | None, project: str | None = None, agent: str | None = None) -> list[dict[str, Any]]:
    """The report's rows, oldest or most costly first; figures exact (cost in USD as a float). With an agent, only
    that agent's usage, as the server filters it (blocks are Claude Code's anyway). Not the limits report's: its
    rows are readings (limit_rows)."""
    if kind == "agent":
        return [row for row in agent_rows(client, start, end, user, project) if agent in (None, row["agent"])]
    if kind == "project":  # '' is the sessions without a project
        return [project_row(p.project, p.sessions, p.split) for p in client.projects(start, end, user, project, agent)]
    if kind == "model":
        return [{"model": m.model, **usage_fields(m.usage),  # None: not known (usage from metrics has no durations)
                 "avg_duration_ms": m.usage.duration_ms // m.usage.requests if m.usage.requests else None,
                 "avg_ttft_ms": m.usage.ttft_ms // m.usage.ttft_count if m.usage.ttft_count else None}
                for m in client.models(start, end, user, project, agent)]
    if kind == "blocks":
        return [{"block_start": dt.datetime.fromtimestamp(b.start_ms / 1000, zone).isoformat(timespec="minutes"),
                 "block_end": dt.datetime.fromtimestamp(b.end_ms / 1000, zone).isoformat(timespec="minutes"),
                 "window": "claude" if b.from_claude else "auto",  # Claude's own reset time, or guessed
                 "premium_tokens": b.split.premium.limited, **usage_fields(b.split.total)}
                for b in client.blocks(start, end, user, project)]
    if kind == "session":
        return [{"session_id": s.session_id, "user": s.user, "project": s.project,
                 "first_request": dt.datetime.fromtimestamp(s.first_ms / 1000, zone).isoformat(timespec="seconds"),
                 "last_request": dt.datetime.fromtimestamp(s.last_ms / 1000, zone).isoformat(timespec="seconds"),
                 **usage_fields(s.split.total), "models": " ".join(s.models), "tool_calls": s.tool_calls,
                 "tool_failures": s.tool_failures, "api_errors": s.api_errors,
                 "source": s.source, "agent": s.agent}
                for s in client.sessions(start, end, user, limit=MAX_SESSIONS, project=project, agent=agent)]
    groups: dict[str, Split] = {}
    for usage in reversed(client.days(start, end, zone.key, user, project, agent)):
        if usage.split.total == Usage():  # as ccusage: a period without usage is no row (the totals say it all)
            continue
        day = dt.date.fromisoformat(usage.date)
        label = {"daily": usage.date, "weekly": (day - dt.timedelta(days=day.weekday())).isoformat(),
                 "monthly": usage.date[:7]}[kind]
        previous = groups.get(label, Split())
        groups[label] = previous + usage.split
    column = {"daily": "date", "weekly": "week_of", "monthly": "month"}[kind]
    return [{column: label, **usage_fields(split.total), "premium_requests": split.premium.requests,
             "premium_cost_usd": split.premium.cost_nanos / NANOS_PER_USD} for label, split in groups.items()]


LIMIT_CHART_LINES = 10  # each of a limits report's charts: 7 rows of readings, the axis, its times, the legend


def limit_charts(readings: Iterable[LimitReading], start: int, end: int, zone: ZoneInfo, width: int,
                 unicode: bool) -> list[str]:
    """`ccmon report limits --chart`: for each user (in the order of their first reading), Claude's 5-hour and
    weekly % over the period, each under a title: the newest reading by each moment, 0 once its window has
    reset, each reset marked on the axis (week_chart's columns); a window no reading has is not drawn."""
    readings = list(readings)
    users = list(dict.fromkeys(r.user for r in readings))
    lines = []
    for user in users:
        mine = [r for r in readings if r.user == user]
        for window, name in (("five_hour", "5-hour"), ("seven_day", "weekly")):
            if any(getattr(r, window) for r in mine):
                whose = f", user {printable(user or '(unknown)')}" if len(users) > 1 or user else ""
                lines += ["", f"Claude's {name} limit, % used{whose}",
                          *week_chart(start, end, mine, (), width, LIMIT_CHART_LINES, unicode, zone, str, window)]
    return lines


def limit_fields(reading: LimitReading, zone: ZoneInfo) -> dict[str, Any]:
    """A reading of Claude's limits (or another agent's plan's: Codex's) as a report row, named by whose limits
    they are: times local, a window it did not have as None."""
    def local(ms: int, spec: str) -> str:
        return dt.datetime.fromtimestamp(ms / 1000, zone).isoformat(timespec=spec)

    figures = [(window.percent, local(window.resets_ms, "minutes")) if window else (None, None)
               for window in (reading.five_hour, reading.seven_day)]
    return dict(zip(LIMIT_FIELDS, (LIMITS_OF[reading.agent], local(reading.read_ms, "seconds"), reading.user,
                                   reading.session_id, *figures[0], *figures[1])))


def limit_rows(series: UsageSeries, zone: ZoneInfo, agent: str | None) -> list[dict[str, Any]]:
    """The limits report's rows: the period's readings (period_readings), Claude's then the other agents', of one
    agent's limits when given."""
    return [limit_fields(reading, zone) for reading in series.readings + series.agent_readings
            if agent in (None, reading.agent)]


def report_totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    summed = [key for key in rows[0] if key in (*USAGE_FIELDS, "premium_requests", "premium_cost_usd", "tool_calls",
                                                 "tool_failures", "api_errors", "premium_tokens", "sessions")] \
        if rows else list(USAGE_FIELDS)
    totals = {key: sum(row[key] for row in rows) for key in summed}
    for key in ("cost_usd", "premium_cost_usd"):  # sums of floats: round back to the nano-dollar they came from
        if key in totals:
            totals[key] = round(totals[key], 9)
    return totals


# Tables name columns briefly (JSON and CSV keep the full keys), and drop these first to fit their width
# (--wide keeps everything).
TABLE_HEADERS = {"session_id": "session", "first_request": "first", "last_request": "last", "requests": "req",
                 "input_tokens": "input", "output_tokens": "output", "cache_read_tokens": "cache_read",
                 "cache_creation_tokens": "cache_write", "total_tokens": "tokens", "cost_usd": "cost",
                 "premium_requests": "premium_req", "premium_cost_usd": "premium_cost", "premium_tokens": "premium",
                 "avg_duration_ms": "avg_ms", "avg_ttft_ms": "ttft_ms", "tool_calls": "tools",
                 "tool_failures": "failed", "api_errors": "errors", "block_start": "start", "block_end": "end",
                 "read_at": "read", "five_hour_percent": "5h", "five_hour_resets": "5h_resets",
                 "seven_day_percent": "week", "seven_day_resets": "week_resets"}
TABLE_DROP_ORDER = ("tool_failures", "api_errors", "source", "agent", "cache_creation_tokens", "cache_read_tokens",
                    "last_request", "premium_cost_usd", "premium_requests", "tool_calls", "project", "avg_ttft_ms",
                    "block_end", "input_tokens", "output_tokens", "models")


def table_cell(key: str, value: Any, wide: bool) -> str:
    """A report value as a table shows it: costs as the monitor shows them, counts with separators, and
    (unless wide) session ids and hashed user ids shortened, times to the minute (the zone is in the title)."""
    if value is None:
        return "-"
    if key.endswith("_percent"):
        return f"{value:g}%"
    if isinstance(value, float):
        return format_cost(round(value * NANOS_PER_USD)) if "cost" in key else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    if wide:
        return str(value)
    if key == "session_id":
        return short_session(value)
    if key == "user":
        return short_user(value) or "-"  # a user no record named
    if key in ("first_request", "last_request", "block_start", "block_end", "read_at", "five_hour_resets",
               "seven_day_resets"):
        return value[:16].replace("T", " ")
    return str(value)


def report_table(rows: list[dict[str, Any]], totals: dict[str, Any], width: int | None = None,
                 chart: str | None = None, unicode: bool = False, empty: str = "no usage in this period") -> str:
    """An aligned text table with a totals row (unless `totals` is empty); numbers right-aligned. Within `width`
    columns (None: all), dropping the columns of TABLE_DROP_ORDER that do not fit, and saying which. With a chart
    (a key of CHART_KEYS), a bar after each row in the width the table leaves (at least CHART_LEAST; CHART_WIDE
    when the table is wide), the longest for the largest row."""
    if not rows:
        return empty
    columns = list(rows[0])
    numeric = {k: isinstance(next((row[k] for row in rows if row[k] is not None), 0), (int, float)) for k in columns}
    cells = {k: [table_cell(k, row[k], width is None) for row in rows] +
             ["Total" if k == columns[0] else table_cell(k, totals[k], width is None) if k in totals else ""]
             for k in columns}
    if "project" in columns:  # short names unless wide, told apart from one another
        labels = project_labels(row["project"] for row in rows)
        cells["project"][:len(rows)] = [labels[row["project"]] if width is not None else row["project"] or NO_PROJECT
                                        for row in rows]
    cells = {k: list(map(printable, column)) for k, column in cells.items()}  # names are anyone's text
    headers = {k: TABLE_HEADERS.get(k, k) for k in columns}
    body = [[cells[k][i] for k in columns] for i in range(len(rows) + 1)]
    fitted = fit_columns([Column(headers[k], max(len(headers[k]), *map(len, cells[k])), drop_rank(k), left=not numeric[k])
                          for k in columns], body, sys.maxsize if width is None else width - (CHART_LEAST + 2) * bool(chart),
                         gap=2)
    shown = {columns[f.index] for f in fitted}
    hidden = [headers[k] for k in sorted(set(columns) - shown, key=drop_rank, reverse=True)]  # in the order dropped

    def line(values: list[str]) -> str:
        return row_text(fitted, values, gap=2).rstrip()

    rule_line = "  ".join("-" * f.width for f in fitted)
    note = textwrap.wrap(f"(to fit {width} columns, not shown: {', '.join(hidden)}; --wide shows every column)",
                         width) if hidden else []
    head, rows_text = [line([headers[k] for k in columns]), rule_line], [line(cells) for cells in body[:-1]]
    if chart:
        bar_width = CHART_WIDE if width is None else width - len(rule_line) - 2
        values = [row[CHART_KEYS[chart]] for row in rows]
        largest = max(values)
        shown = format_cost(round(largest * NANOS_PER_USD)) if chart == "cost" else format_count(largest)
        forms = (f"{chart}, longest {shown}", f"longest {shown}", shown)  # the scale stays, whatever the width
        title = next(t for t in forms if len(t) <= bar_width or t == shown)
        head = [head[0].ljust(len(rule_line)) + "  " + title, rule_line + "  " + "-" * bar_width]
        rows_text = [(text.ljust(len(rule_line)) + "  " + hbar(value, largest, bar_width, unicode)).rstrip()
                     for text, value in zip(rows_text, values)]
    total_lines = [rule_line, line(body[-1])] if totals else []
    return "\n".join([*head, *rows_text, *total_lines, *note])


CHART_KEYS = {"cost": "cost_usd", "tokens": "total_tokens"}  # --chart's values: what the bars are of
CHART_REPORTS = ("daily", "weekly", "monthly", "model", "project", "agent", "limits")
CHART_LEAST = 10  # a report's bars are at least this wide: the table drops columns for them
CHART_WIDE = 40   # and this wide beside a --wide table, which has no width to fill


def check_report_chart(kind: str, chart: str | None) -> None:
    if chart and kind not in CHART_REPORTS:
        raise ConfigError(f"--chart: charts are drawn for the {', '.join(CHART_REPORTS[:-1])} and "
                          f"{CHART_REPORTS[-1]} reports, not the {kind} report")
    if chart == "tokens" and kind == "limits":
        raise ConfigError("--chart tokens: the limits report draws Claude's own percentages (use --chart)")


def drop_rank(key: str) -> int:
    """A report column's priority: those TABLE_DROP_ORDER names first are dropped first, the rest never."""
    return len(TABLE_DROP_ORDER) - TABLE_DROP_ORDER.index(key) if key in TABLE_DROP_ORDER else 0


def report_flags_period(args: argparse.Namespace, zone: ZoneInfo) -> tuple[int, int]:
    """The period a report's flags ask for; raises ConfigError for flags that cannot go together."""
    if args.kind == "limits" and args.project:
        raise ConfigError("--project: Claude's limits are an account's, not a project's (use --user)")
    check_report_chart(args.kind, args.chart)
    check_report_agent(args.kind, args.agent, args.chart)
    start, end = report_period(args.kind, parse_day(args.since, "--since"), parse_day(args.until, "--until"), zone,
                               now_ms())
    first, last = (dt.datetime.fromtimestamp(ms / 1000, zone).date() for ms in (start, max(start, end - 1)))
    if args.kind in ("daily", "weekly", "monthly") and (last - first).days >= MAX_DAYS:
        raise ConfigError(f"--since {first}: the {args.kind} report covers at most {MAX_DAYS} days, this period "
                          f"{(last - first).days + 1}: give a later --since or an earlier --until")
    return start, end


def run_report(config: Config, args: argparse.Namespace) -> int:
    zone = config.zone
    start, end = report_flags_period(args, zone)
    client = Client.for_config(config, timeout_s=30.0, go_extras_empty=False)
    try:
        if args.kind == "limits":  # the readings asked once: the table's rows and the chart's
            series = period_readings(client, start, end, zone.key, args.user)
            rows, readings = limit_rows(series, zone, args.agent), series.readings
        else:
            rows, readings = report_rows(client, args.kind, start, end, zone, args.user, args.project, args.agent), ()
    except GoCcmonServer:
        print(f"ccmon: {config.monitor_server} is the Go ccmon server, which answers only GetStats and GetAPIRequests: "
              f"the {args.kind} report needs ccmon's own server", file=sys.stderr)
        return 1
    except ServerUnreachable as exc:
        print(f"ccmon: cannot reach the ccmon server at {config.monitor_server}: {printable(str(exc))}",
              file=sys.stderr)
        return 1
    finally:
        client.close()
    totals = {} if args.kind == "limits" else report_totals(rows)  # percentages of different windows do not add up
    period = {"since": dt.datetime.fromtimestamp(start / 1000, zone).isoformat(timespec="seconds"),
              "until": dt.datetime.fromtimestamp(end / 1000, zone).isoformat(timespec="seconds"),
              "timezone": zone.key}
    if args.json:
        print(json_text({"report": args.kind, **period, "user": args.user, "project": args.project,
                         "agent": args.agent, "rows": rows, "totals": totals}))
    elif args.csv:
        import csv
        writer = csv.DictWriter(sys.stdout, lineterminator="\n", fieldnames=list(rows[0]) if rows else
                                list(LIMIT_FIELDS if args.kind == "limits" else USAGE_FIELDS))
        writer.writeheader()
        writer.writerows({k: printable(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows)
        if rows and totals:
            totals_row = {k: v for k, v in totals.items() if k in writer.fieldnames}
            writer.writerow({**totals_row, writer.fieldnames[0]: "Total"})
    else:
        print(printable(f"{args.kind} report, {period['since']} to {period['until']} ({zone.key})"
                        + (f", user {args.user}" if args.user else "")
                        + (f", project {args.project}" if args.project else "")
                        + (f", agent {args.agent}" if args.agent else "")))
        unicode = args.chart is not None and utf8_locale()
        print(report_table(rows, totals, None if args.wide else REPORT_WIDTH,
                           None if args.kind == "limits" else args.chart, unicode,
                           "no readings of Claude's limits, nor of Codex's, in this period (ccmon statusline stores "
                           "Claude's, ccmon import Codex's)"
                           if args.kind == "limits" else "no usage in this period"))
        if args.kind == "limits" and args.chart and rows:
            print("\n".join(limit_charts(readings, start, end, zone, REPORT_WIDTH, unicode)) if readings else
                  "\nno readings of Claude's limits in this period to chart (--chart draws Claude's own, not Codex's)")
    return 0


# ---------------------------------------------------------------- Web dashboard: GET / and /api/ on the HTTP listener
# The page is static (one HTML, one JS and one CSS file beside ccmon.py, in ccmon.pyz with it); what it shows comes
# from GET /api/dashboard, answered from the store's reads the QueryService answers with, through web_json.

DASHBOARD_FILES = {"/": ("dashboard.html", "text/html; charset=utf-8"),
                   "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
                   "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}
DASHBOARD_ROWS = 50       # the newest requests and sessions the dashboard lists
DASHBOARD_SLOTS = 4       # dashboard answers computed at once; more are told to ask again (as QUERY_SLOTS)
DASHBOARD_PARAMETERS = ("period", "user", "project", "agent", "tz")
SESSION_COOKIE = "ccmon_session"
SESSION_S = 30 * 86400    # how long a sign-in lasts


@dataclasses.dataclass(frozen=True)
class WindowReading:
    """One of Claude's windows of a user's as last read (its share then) and when that was."""
    window: LimitWindow
    read_ms: int


def window_reading(claude: ClaudeLimits, name: str, now: int) -> WindowReading | None:
    """The five_hour or seven_day window as last read, while it has not reset."""
    window = claude.window(name, now)
    return WindowReading(window, claude.read_ms(name)) if window else None


def moment_text(ms: int, now: int, zone: ZoneInfo) -> str:
    """14:03:05 today, 03-01 14:03 on another day."""
    return local_time(ms, zone, "%H:%M:%S" if local_time(ms, zone, "%Y-%m-%d") == local_time(now, zone, "%Y-%m-%d")
                      else "%m-%d %H:%M")


# Beside each value's fields, what the monitor shows for it: the page formats nothing itself.
WEB_EXTRAS: dict[type, Callable[[Any, int, ZoneInfo], dict]] = {
    Usage: lambda u, now, zone: {"limited": u.limited, "cache": u.cache, "total": u.total, "text": {
        "cost": format_cost(u.cost_nanos), "requests": format_count(u.requests), "tokens": format_count(u.total),
        "input": format_count(u.input), "output": format_count(u.output), "cache": format_count(u.cache),
        "limited": format_count(u.limited), "duration": format_duration(u.duration_ms)}},
    Split: lambda split, now, zone: {"total": web_json(split.total, now, zone)},
    LimitWindow: lambda window, now, zone: {"text": {"percent": format_percent(window.percent),
                                                     "resets": reset_time(window.resets_ms, now, zone)}},
    WindowReading: lambda reading, now, zone: {"text": {"age": reading_age(reading.read_ms, now)}},
    ApiRequest: lambda r, now, zone: {"text": {"time": moment_text(r.ts_ms, now, zone)}},
    Session: lambda s, now, zone: {"text": {"first": moment_text(s.first_ms, now, zone),
                                            "last": moment_text(s.last_ms, now, zone)}},
    UserUsage: lambda u, now, zone: {"text": {"name": u.user or "(unknown)"}},
    HistoryReading: lambda reading, now, zone: {"text": files_read(reading)},
    ProjectUsage: lambda p, now, zone: {"text": {"name": p.project or NO_PROJECT}},
}


def web_json(value: Any, now: int, zone: ZoneInfo) -> Any:
    """Values as JSON: each field exact (costs in integer nano-dollars, times in ms since the epoch), and beside
    them, under "text", the figures as the monitor shows them (format_cost, format_count, ...) at `now` in `zone`."""
    if dataclasses.is_dataclass(value):
        extras = WEB_EXTRAS.get(type(value))
        return {**{field.name: web_json(getattr(value, field.name), now, zone) for field in dataclasses.fields(value)},
                **(extras(value, now, zone) if extras else {})}
    if isinstance(value, dict):
        return {key: web_json(item, now, zone) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [web_json(item, now, zone) for item in value]
    return value


@dataclasses.dataclass(frozen=True)
class DashboardQuery:
    """What the page asks for: the monitor's period (PERIODS) and filters, and the zone of its days and times."""
    period: str
    user: str | None
    project: str | None
    zone: ZoneInfo
    agent: str | None = None  # one of AGENTS: its models' usage only, as the QueryService's agent filter


def dashboard_query(query: str, default_zone: ZoneInfo) -> DashboardQuery:
    """GET /api/dashboard's parameters; a ValueError says what is wrong with one."""
    params = parse_qs(query, keep_blank_values=True, max_num_fields=2 * len(DASHBOARD_PARAMETERS))
    unknown = sorted(set(params) - set(DASHBOARD_PARAMETERS))
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0][:40]!r}; use {', '.join(DASHBOARD_PARAMETERS)}")
    given = {name: values[-1] for name, values in params.items()}
    period = given.get("period") or "a"
    if period not in PERIODS:
        raise ValueError(f"period {period[:20]!r} is none of {', '.join(PERIODS)} "
                         f"({', '.join(name for name, _ in PERIODS.values())})")
    zone = zone_or_none(given["tz"]) if given.get("tz") else default_zone
    if zone is None:
        raise ValueError(f"unknown timezone {given['tz'][:100]!r}")
    agent = given.get("agent") or None
    if agent is not None and agent not in AGENTS:
        raise ValueError(unknown_agent(agent))
    return DashboardQuery(period, given.get("user") or None, given.get("project") or None, zone, agent)


def dashboard_period(reader: Reader, query: DashboardQuery, now: int) -> tuple[int, int]:
    """[start, end) of the period asked for; the current block is the automatic 5-hour block running now (Claude's
    own window where a reading gives it), empty between blocks."""
    if query.period == "b":
        running = [b for b in reader.blocks(now - BLOCK_MS, now, query.user) if b.start_ms <= now < b.end_ms]
        return (running[-1].start_ms if running else now), now
    span = PERIODS[query.period][1]
    return (now - span if span else 0), now


def dashboard(reader: Reader, query: DashboardQuery, now: int) -> dict[str, Any]:
    """Everything the page shows, as JSON values: today's, this week's (from Monday) and this month's usage, the
    period's, every user's latest reading of Claude's windows (and of other agents' own plans'), the last 30 days,
    the period by user, model, agent and project, its newest requests and sessions; all of one agent's when asked."""
    user, project, agent, zone = query.user, query.project, query.agent, query.zone
    start, end = dashboard_period(reader, query, now)
    midnight, month_start, _ = day_and_month_start(now, zone)
    today = dt.datetime.fromtimestamp(now / 1000, zone).date()
    monday = ms_from_datetime(dt.datetime.combine(today - dt.timedelta(days=today.weekday()), dt.time(), zone))

    def usage(lo: int, hi: int) -> Split:
        return reader.split(reader.usage(lo, hi, user=user, project=project, agent=agent))

    limits = [{"user": name, "of": LIMITS_OF[whose],  # Claude's limits, then other agents' own plans' (Codex's)
               **{window: window_reading(claude, window, now) for window in ("five_hour", "seven_day")}}
              for whose in AGENTS if agent in (None, whose) for name, claude in reader.live_limits(now, whose).items()
              if user is None or name == user]
    models = reader.models(start, end, user, project, agent)
    figures = {"today": usage(midnight, now), "week": usage(monday, now), "month": usage(month_start, now),
               "period_usage": usage(start, end), "limits": limits,
               "days": reader.days(zone, None, now, user, project, agent)[::-1],  # oldest first, as the chart draws
               "users": reader.users(start, end, project, agent), "models": models,
               "agents": usage_of_agents(models), "projects": reader.projects(start, end, user, agent=agent),
               "requests": reader.requests_page(start, end, DASHBOARD_ROWS, 0, False, user, project, agent),
               "sessions": reader.sessions(start, end, user, DASHBOARD_ROWS, project=project, agent=agent)}
    return {"version": VERSION, "now_ms": now, "timezone": zone.key, "user": user, "project": project,
            "agent": agent, "agent_names": list(AGENTS),
            "period": {"key": query.period, "name": PERIODS[query.period][0], "start_ms": start, "end_ms": end},
            "periods": [{"key": key, "name": name} for key, (name, _) in PERIODS.items()],
            "stored_requests": reader.totals().requests, **web_json(figures, now, zone)}


def session_cookie(token: str, expires_s: int) -> str:
    """A sign-in that holds until expires_s: the time and its HMAC under the token. It is not the token (it opens
    the dashboard alone, not exports or the QueryService), and a new token ends every sign-in."""
    mac = hmac.new(token.encode(), f"ccmon dashboard until {expires_s}".encode(), hashlib.sha256).hexdigest()
    return f"{expires_s}.{mac}"


def signed_in(cookie_header: str | None, token: str, now_s: int) -> bool:
    """Whether the Cookie header holds a sign-in of `token`'s that has not expired (compared in constant time)."""
    for part in (cookie_header or "").split(";"):
        name, _, value = part.strip().partition("=")
        expires = value.partition(".")[0]
        if name == SESSION_COOKIE and re.fullmatch(r"[0-9]{1,12}", expires) and int(expires) > now_s and \
                hmac.compare_digest(value.encode(), session_cookie(token, int(expires)).encode()):
            return True
    return False


def addressed_safely(host_header: str | None, listen_host: str) -> bool:
    """Whether a request names this server as DNS rebinding cannot: by an IP address, localhost, or the host name
    the listener was given. Another name could be a web site's, resolved to this machine to read the dashboard."""
    try:
        host = urlsplit("//" + (host_header or "")).hostname or ""
    except ValueError:
        return False
    if host in ("localhost", listen_host.strip("[]").lower()) or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def accepts_gzip(header: str | None) -> bool:
    """Whether an Accept-Encoding header takes gzip (named, and not with q=0)."""
    for item in (header or "").split(","):
        name, _, weight = item.partition(";")
        if name.strip().lower() == "gzip":
            return not re.fullmatch(r"q=0(?:\.0{0,3})?", weight.replace(" ", "").lower())
    return False


class Dashboard:
    """The web dashboard's pages over one Reader: the page, its files, sign-in and out, and its JSON; `history`, the
    local server's first reading of the histories while it is under way (the figures are partial till it is done)."""

    def __init__(self, reader: Reader, token: str, zone: ZoneInfo, files: dict[str, bytes], listen_host: str,
                 history: Callable[[], HistoryReading | None] = lambda: None):
        self.reader, self.token, self.zone, self.files, self.listen_host = reader, token, zone, files, listen_host
        self.history = history
        self.slots = threading.BoundedSemaphore(DASHBOARD_SLOTS)
        self.refusals = RefusalLog()

    def pages(self) -> Pages:
        return {"/": {"GET": self.index}, "/dashboard.js": {"GET": self.asset}, "/dashboard.css": {"GET": self.asset},
                "/login": {"POST": self.login}, "/logout": {"POST": self.logout}, "/api/dashboard": {"GET": self.api}}

    def _refusal(self, request: PageRequest) -> str:
        """Why the request may not read the dashboard ('' when it may): without a token, only a request addressed
        safely; with one, only with its sign-in cookie or its bearer token."""
        if not self.token:
            return "" if addressed_safely(request.headers.get("Host"), self.listen_host) else "host"
        if signed_in(request.headers.get("Cookie"), self.token, now_ms() // 1000) or \
                bearer_matches(request.headers.get("Authorization"), self.token):
            return ""
        self.refusals.note(f"dashboard {request.path}", request.client, "no sign-in" if request.path == "/" else
                           refusal_reason(request.headers.get("Authorization")))
        return "token"

    @staticmethod
    def _host_refused() -> PageAnswer:
        return text_answer(403, "without a token the dashboard answers only at an IP address or localhost (no web "
                                "site can then reach it by a name of its own): set server.token to open it by name")

    def _page(self, status: int, view: str, *headers: tuple[str, str]) -> PageAnswer:
        """The page, showing `view` (dashboard, login or login-failed): the HTML is the same, its body says which."""
        body = self.files["/"].replace(b'data-view="dashboard"', f'data-view="{view}"'.encode(), 1)
        return PageAnswer(status, DASHBOARD_FILES["/"][1], body, (NO_STORE, *headers))

    def index(self, request: PageRequest) -> PageAnswer:
        refused = self._refusal(request)
        if refused == "host":
            return self._host_refused()
        if refused:
            return self._page(401, "login", ("WWW-Authenticate", 'Bearer realm="ccmon"'))
        return self._page(200, "dashboard")

    def asset(self, request: PageRequest) -> PageAnswer:
        """The page's script and style: the same for everyone (they hold no figures; the sign-in page uses them)."""
        if not self.token and not addressed_safely(request.headers.get("Host"), self.listen_host):
            return self._host_refused()
        body = self.files[request.path]
        tag = f'"{hashlib.sha256(body).hexdigest()[:20]}"'
        headers = (("Cache-Control", "no-cache"), ("ETag", tag))  # kept, but asked after each time: 304 if unchanged
        if tag in [given.strip() for given in (request.headers.get("If-None-Match") or "").split(",")]:
            return PageAnswer(304, DASHBOARD_FILES[request.path][1], b"", headers)
        return PageAnswer(200, DASHBOARD_FILES[request.path][1], body, headers)

    def login(self, request: PageRequest) -> PageAnswer:
        """The sign-in form's POST (token=...): the right token sets the sign-in cookie."""
        if not self.token:
            return PageAnswer(303, "text/plain; charset=utf-8", b"", (("Location", "/"), NO_STORE))
        try:
            form = parse_qs(request.body.decode("utf-8", "replace"), max_num_fields=4)
        except ValueError:
            form = {}
        given = (form.get("token") or [""])[-1]
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            self.refusals.note("dashboard sign-in", request.client, "wrong token")
            return self._page(401, "login-failed", ("WWW-Authenticate", 'Bearer realm="ccmon"'))
        expires = now_ms() // 1000 + SESSION_S
        cookie = f"{SESSION_COOKIE}={session_cookie(self.token, expires)}; Max-Age={SESSION_S}; Path=/; HttpOnly; " \
                 "SameSite=Strict" + ("; Secure" if request.tls else "")
        return PageAnswer(303, "text/plain; charset=utf-8", b"", (("Location", "/"), ("Set-Cookie", cookie), NO_STORE))

    def logout(self, request: PageRequest) -> PageAnswer:
        cookie = f"{SESSION_COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict" + \
            ("; Secure" if request.tls else "")
        return PageAnswer(303, "text/plain; charset=utf-8", b"", (("Location", "/"), ("Set-Cookie", cookie), NO_STORE))

    def api(self, request: PageRequest) -> PageAnswer:
        refused = self._refusal(request)
        if refused == "host":
            return self._host_refused()
        if refused:
            return json_answer(401, {"error": "missing or wrong token: sign in at / or send Authorization: Bearer"},
                               (("WWW-Authenticate", 'Bearer realm="ccmon"'),))
        try:
            query = dashboard_query(request.query, self.zone)
        except ValueError as exc:
            return json_answer(400, {"error": str(exc)})
        if not self.slots.acquire(blocking=False):
            return json_answer(503, {"error": f"the server is answering {DASHBOARD_SLOTS} dashboards already; ask "
                                              "again in a moment"}, (("Retry-After", "1"),))
        try:
            now = now_ms()
            return json_answer(200, {**dashboard(self.reader, query, now), "sign_out": bool(self.token),
                                     "history": web_json(self.history(), now, query.zone)},
                               gzip=accepts_gzip(request.headers.get("Accept-Encoding")))
        except (sqlite3.Error, DatabaseMoved) as exc:
            log.error("the dashboard cannot read the database: %s", exc)
            return json_answer(503, {"error": f"the database cannot be read right now: {exc}"})
        finally:
            self.slots.release()


def dashboard_pages(config: Config, reader: Reader, history: Callable[[], HistoryReading | None]) -> Pages:
    """The web dashboard's pages for the HTTP listener; none, with a warning, when its files are missing."""
    try:
        files = {path: Path(__file__).with_name(name).read_bytes() for path, (name, _) in DASHBOARD_FILES.items()}
    except OSError as exc:
        log.warning("the web dashboard is off: %s is missing beside ccmon.py", Path(exc.filename or "").name)
        return {}
    host = parse_address(config.server_http_address, fail_as=ServerError)[0]
    return Dashboard(reader, config.server_token, config.zone, files, host, history).pages()


# ---------------------------------------------------------------- Prometheus metrics: GET /metrics on the HTTP listener

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"  # the text exposition format
# How many users, models and projects get a label value of their own: the first ones by id, the order the database
# first saw them in (it never changes, so a series never leaves its label); the others are summed under OTHER_LABEL.
METRICS_LABELS = {"user": 100, "model": 20, "project": 100}
# How many (user, model, project) series get labels of their own, the first ones by id (the order they first
# occurred in); later ones are summed under OTHER_LABEL in all three, per agent: a counter family holds at most one
# more per agent. The agent label is the model's, which never changes once it has usage: it is never OTHER_LABEL,
# and it splits only what is past the caps.
METRICS_SERIES = 2000
OTHER_LABEL = "(other)"
LABEL_MAX = 100  # characters of a label value from telemetry; a longer one is cut, ending in …
TOKEN_TYPES = ("input", "output", "cache_read", "cache_creation")  # the type label: Usage's fields


def label_value(name: str | None) -> str:
    """A name from telemetry as a label value: OTHER_LABEL beyond the cap, cut to LABEL_MAX characters, escaped as
    the format wants (backslash, double quote, line feed)."""
    text = OTHER_LABEL if name is None else name if len(name) <= LABEL_MAX else name[:LABEL_MAX - 1] + "…"
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def decimal_text(value: int, places: int) -> str:
    """value / 10**places written exactly in decimal (nanos as USD, ms as seconds): Prometheus reads it as the
    nearest float64."""
    whole, part = divmod(abs(value), 10 ** places)
    fraction = f"{part:0{places}d}".rstrip("0")
    return ("-" if value < 0 else "") + str(whole) + (f".{fraction}" if fraction else "")


def metric_family(name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], str]]) -> list[str]:
    """One metric's HELP and TYPE lines and its samples ({label: escaped value}, value), in a stable order."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in sorted(samples, key=lambda sample: sorted(sample[0].items())):
        labelled = ",".join(f'{key}="{text}"' for key, text in labels.items())
        lines.append(f"{name}{{{labelled}}} {value}" if labelled else f"{name} {value}")
    return lines


def limit_gauges(name: str, helps: tuple[str, str], limits: dict[tuple[str, ...], ClaudeLimits],
                 labels: tuple[str, ...], now: int) -> list[str]:
    """The used ratio and reset time of each live window of these limits (keyed by the values of `labels`)."""
    windows = [({**{label: label_value(value) for label, value in zip(labels, key)}, "window": window}, reading)
               for key, limits_of in limits.items() for window in ("five_hour", "seven_day")
               if (reading := limits_of.window(window, now)) is not None]
    return metric_family(f"ccmon_{name}_limit_used_ratio", "gauge", helps[0],
                         [(labels, repr(reading.percent / 100)) for labels, reading in windows]) + \
        metric_family(f"ccmon_{name}_limit_resets_timestamp_seconds", "gauge", helps[1],
                      [(labels, decimal_text(reading.resets_ms, 3)) for labels, reading in windows])


def exposition(series: list[CounterSeries], limits: dict[str, ClaudeLimits], receipts: list[ReceiverCounts],
               models: list[tuple[str, str]], plans: dict[tuple[str, str], ClaudeLimits], now: int) -> str:
    """The metrics in Prometheus's text format. Series whose label values end up the same (cut to the same
    text, or a user named like OTHER_LABEL) are summed: each sum of counters still only goes up."""
    merged: dict[tuple[str, str, str, str], Usage] = {}
    for one in series:
        key = (label_value(one.user), label_value(one.model), label_value(one.project), label_value(one.agent))
        merged[key] = merged.get(key, Usage()) + one.usage
    labelled = [({"user": user, "model": model, "project": project, "agent": agent}, usage)
                for (user, model, project, agent), usage in merged.items()]
    lines = metric_family("ccmon_requests_total", "counter", "API requests stored, ever (retention does not lower it).",
                          [(labels, str(usage.requests)) for labels, usage in labelled])
    lines += metric_family("ccmon_tokens_total", "counter", "Tokens by type, ever (retention does not lower it).",
                           [({**labels, "type": kind}, str(getattr(usage, kind)))
                            for labels, usage in labelled for kind in TOKEN_TYPES])
    lines += metric_family("ccmon_cost_usd_total", "counter", "Cost in USD, ever (retention does not lower it).",
                           [(labels, decimal_text(usage.cost_nanos, 9)) for labels, usage in labelled])
    lines += limit_gauges("claude", ("The share of Claude's own 5-hour or weekly limit used (0-1), as last read from "
                                     "a status line, while the window has not reset.", "When that window of Claude's "
                                     "starts afresh (Unix time)."),
                          {(user,): claude for user, claude in limits.items()}, ("user",), now)
    lines += limit_gauges("plan", ("The share of another agent's own plan's 5-hour or weekly limit used (0-1) "
                                   "(Codex's), as last read from its history, while the window has not reset.",
                                   "When that window of the agent's plan starts afresh (Unix time)."),
                          plans, ("agent", "user"), now)
    receivers = [({"protocol": counts.protocol, "signal": counts.signal}, counts) for counts in receipts]
    lines += metric_family("ccmon_receiver_records_accepted_total", "counter", "OTLP records a receiver accepted.",
                           [(labels, str(counts.accepted)) for labels, counts in receivers])
    lines += metric_family("ccmon_receiver_records_rejected_total", "counter", "OTLP records a receiver rejected.",
                           [(labels, str(counts.rejected)) for labels, counts in receivers])
    lines += metric_family("ccmon_receiver_last_accepted_timestamp_seconds", "gauge", "When a receiver last "
                           "accepted a record (Unix time).", [(labels, decimal_text(counts.last_ms, 3))
                                                               for labels, counts in receivers if counts.last_ms])
    agents: dict[str, str] = {OTHER_LABEL: OTHER_LABEL}  # the models past the cap: anybody's
    for model, agent in models:  # models cut to the same text: one line, of (other) if of two agents
        label = label_value(model)
        agents[label] = agent if agents.get(label, agent) == agent else OTHER_LABEL
    lines += metric_family("ccmon_model_info", "gauge", "Which agent sends each model the counters name (1); "
                           "the counters carry it as their agent label too.",
                           [({"model": model, "agent": agent}, "1") for model, agent in agents.items()])
    lines += metric_family("ccmon_build_info", "gauge", "The ccmon version serving these metrics.",
                           [({"version": label_value(VERSION)}, "1")])
    return "\n".join(lines) + "\n"


class MetricsPage:
    """GET /metrics over one Reader: with a token, only for 'Authorization: Bearer TOKEN' (what Prometheus's
    `authorization` scrape setting sends); without one, only addressed safely, as the dashboard."""

    def __init__(self, reader: Reader, token: str, listen_host: str):
        self.reader, self.token, self.listen_host = reader, token, listen_host
        self.refusals = RefusalLog()

    def pages(self) -> Pages:
        return {"/metrics": {"GET": self.metrics}}

    def metrics(self, request: PageRequest) -> PageAnswer:
        authorization = request.headers.get("Authorization")
        if self.token and not bearer_matches(authorization, self.token):
            self.refusals.note("metrics /metrics", request.client, refusal_reason(authorization))
            return text_answer(401, "missing or wrong bearer token: give Prometheus the server's token in the scrape "
                                    "config's authorization: credentials",
                               (("WWW-Authenticate", 'Bearer realm="ccmon"'),))
        if not self.token and not addressed_safely(request.headers.get("Host"), self.listen_host):
            return text_answer(403, "without a token /metrics answers only at an IP address or localhost (no web site "
                                    "can then reach it by a name of its own): set server.token to scrape it by name")
        now = now_ms()
        try:
            members = set(self.reader.first_users(METRICS_LABELS["user"]))
            limits = {user: claude for user, claude in self.reader.live_limits(now).items() if user in members}
            plans = {(agent, user): plan for agent in AGENTS[1:]
                     for user, plan in self.reader.live_limits(now, agent).items() if user in members}
            series = self.reader.counter_series(METRICS_LABELS, METRICS_SERIES)
            text = exposition(series, limits, self.reader.receiver_counts(),
                              self.reader.first_models(METRICS_LABELS["model"]), plans, now)
        except (sqlite3.Error, DatabaseMoved) as exc:
            log.error("the metrics cannot read the database: %s", exc)
            return text_answer(503, f"the database cannot be read right now: {exc}")
        return packed_answer(200, PROMETHEUS_TEXT, text.encode("utf-8", "replace"),
                             gzip=accepts_gzip(request.headers.get("Accept-Encoding")))


def metrics_pages(config: Config, reader: Reader) -> Pages:
    """GET /metrics for the HTTP listener."""
    host = parse_address(config.server_http_address, fail_as=ServerError)[0]
    return MetricsPage(reader, config.server_token, host).pages()


# ---------------------------------------------------------------- Import: ccmon import, Claude Code's transcripts and other agents' histories

IMPORT_BATCH = 5_000        # requests sent in one ImportRequests call at most: the last call is stored after the
                            # reading ends (the server writes IMPORT_CHUNK a transaction, whatever a call's size)
FIRST_IMPORT_BATCH = 1_000  # the first call's, doubled at each call up to IMPORT_BATCH: the newest are stored soon
IMPORT_CALLS_AHEAD = 2      # calls sent and not answered yet: the reading goes on while the server stores
IMPORT_TIMEOUT_S = 120.0    # one call's patience: a batch is a few thousand inserts
FOLLOW_POLL_S = 1.0         # --follow looks at the transcripts this often
PROGRESS_EVERY_S = 0.25
OTEL_RESOURCE_ENV = "OTEL_RESOURCE_ATTRIBUTES"
NAMED_PER_REASON = 10  # lines named (file:line) for each reason they are skipped; the rest are counted
FIGURES_OUT_OF_RANGE = "figures out of range"
LIMITS_OUT_OF_RANGE = "limits out of range"  # a Codex limit reading the server would refuse (a share over 100 %)
DATED_AHEAD = "dated in the future"  # more than DATED_AHEAD_MS ahead: no answer has come from there yet
DATED_AHEAD_MS = DAY_MS  # no clock is that wrong, or stepped back that far under --follow; a damaged date can be
# the skip reasons that are damage, not Claude Code's own entries
NAMED_REASONS = {"not JSON", FIGURES_OUT_OF_RANGE, LIMITS_OUT_OF_RANGE, DATED_AHEAD}
# message.id and requestId as Claude Code writes an assistant line: a streamed answer's next lines are known
# duplicates without parsing them (JSON escapes the quotes of any such text inside a message)
ANSWER_IDS = re.compile(r'"message":\{"id":"([^"\\]*)".*"requestId":"([^"\\]*)"')


def answer_key(first: str, second: str) -> str:
    """Two ids as one string that no other pair makes (the first's length leads): an import keeps one per answer it
    has read (300,000 answers: 42 MB; as tuples of the two strings, 72 MB)."""
    return f"{len(first)}:{first}{second}"


@dataclasses.dataclass(slots=True)  # not frozen: a frozen one takes 7 times as long to make, 100,000 times an import
class TranscriptEntry:
    """One API answer as a transcript records it: an assistant message with usage."""
    session_id: str
    ts_ms: int
    model: str
    input: int
    output: int
    cache_read: int
    cache_creation: int
    cache_1h: int           # of cache_creation, written for an hour (priced higher)
    request_id: str
    message_id: str
    project: str            # cwd
    cost_usd: str | None    # costUSD, written by older Claude Code versions
    inference_geo: str = ""
    agent: str = CLAUDE_CODE  # whose transcript or history

    @property
    def key(self) -> str:
        """Streaming writes one answer as several lines with the same message.id and requestId: count it once."""
        return answer_key(self.message_id, self.request_id)


def text_or_empty(value: Any) -> str:
    return valid_text(value) if isinstance(value, str) else ""


def token_count(usage: dict, key: str) -> int | None:
    """A token count of the usage: 0 when absent, None when it is no count the server stores (one call's)."""
    value = usage.get(key)
    if value is None:
        return 0
    return value if type(value) is int and 0 <= value < MAX_COUNT else None


def transcript_entry(line: str) -> TranscriptEntry | str | None:
    """One transcript line: an entry, the reason it is skipped ('not JSON', 'synthetic', 'API error', 'no usage',
    'no session or time', FIGURES_OUT_OF_RANGE), or None for lines that are no API answer (user, system,
    attachment, ... lines)."""
    if '"assistant"' not in line:  # cheap: most lines are not an answer
        if line[:1] == "{" and line[-1:] == "}":
            return None
        text = line.strip()
        return "not JSON" if text and (text[0] != "{" or text[-1] != "}") else None
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        return "not JSON"
    if not isinstance(data, dict) or data.get("type") != "assistant":
        return None
    message = data.get("message")
    message = message if isinstance(message, dict) else {}
    model = message.get("model")
    if model == "<synthetic>":
        return "synthetic"
    if data.get("isApiErrorMessage"):
        return "API error"
    usage = message.get("usage")
    if not isinstance(usage, dict):
        return "no usage"
    session, ts = data.get("sessionId"), parse_iso_ms(data.get("timestamp"))
    if not isinstance(session, str) or not session or ts is None:
        return "no session or time"
    detail = usage.get("cache_creation")
    counts = [token_count(usage, key) for key in ("input_tokens", "output_tokens", "cache_read_input_tokens",
                                                   "cache_creation_input_tokens")]
    counts.append(token_count(detail, "ephemeral_1h_input_tokens") if isinstance(detail, dict) else 0)
    if None in counts:
        return FIGURES_OUT_OF_RANGE
    cost = data.get("costUSD")
    return TranscriptEntry(
        valid_text(session), ts, text_or_empty(model) or "unknown", *counts,
        valid_text(str(data.get("requestId") or "")), valid_text(str(message.get("id") or "")),
        text_or_empty(data.get("cwd")),
        repr(cost) if type(cost) in (int, float) and 0 <= cost <= MAX_USD else None,
        usage["inference_geo"] if isinstance(usage.get("inference_geo"), str) else "")


def imported_request(entry: TranscriptEntry, prices: dict[str, Price], found: Price | None = None) \
        -> tuple[ccmon_pb2.ImportedRequest, bool]:
    """The entry as sent to the server, costed: its own costUSD, else ccmon's price table (estimated; `found`:
    the model's price, when looked up already). Also whether its model was priced (False: unknown, at $0)."""
    known = True
    if entry.cost_usd is not None:
        nanos = int((decimal.Decimal(entry.cost_usd) * NANOS_PER_USD).to_integral_value(decimal.ROUND_HALF_EVEN))
    else:
        found = found or price_of(entry.model, prices)
        known = found is not None
        nanos = cost_nanos(found, entry.input, entry.output, entry.cache_read, entry.cache_creation, entry.cache_1h,
                           entry.inference_geo) if found else 0
    return ccmon_pb2.ImportedRequest(
        session_id=entry.session_id, timestamp_ms=entry.ts_ms, model=entry.model, input_tokens=entry.input,
        output_tokens=entry.output, cache_read_tokens=entry.cache_read, cache_creation_tokens=entry.cache_creation,
        cost_nanos=nanos, estimated=entry.cost_usd is None, request_id=entry.request_id,
        message_id=entry.message_id, project_dir=entry.project,
        agent="" if entry.agent == CLAUDE_CODE else entry.agent), known


# The other agents' local histories: one model call each, its figures named as below; each is read into ccmon's
# kinds by the same function as the agent's telemetry (AGENT_CALLS), under its telemetry's attribute names.
AGENT_CALL_OF = {call.agent: call for call in AGENT_CALLS.values()}
HISTORY_TOKEN_NAMES = {GEMINI_CLI: {"input": "input_token_count", "cached": "cached_content_token_count",
                                    "output": "output_token_count", "thoughts": "thoughts_token_count",
                                    "tool": "tool_token_count"},
                       CODEX: {"input_tokens": "input_token_count", "cached_input_tokens": "cached_token_count",
                               "cache_write_input_tokens": "cache_write_token_count",
                               "output_tokens": "output_token_count"},
                       QWEN_CODE: {}}  # Qwen's embeds its api_response event as sent


@dataclasses.dataclass
class HistoryFile:
    """What an agent's history file has told so far (the session, model and folder later lines leave out)."""
    agent: str
    session_id: str = ""
    model: str = ""
    project: str = ""


def history_call(file: HistoryFile, ts_text: Any, session: Any, model: Any, figures: Any, request_id: Any = "",
                 message_id: Any = "") -> TranscriptEntry | str:
    """One model call of an agent's history, in ccmon's kinds (or why it is skipped), as its telemetry maps it."""
    ts, session = parse_iso_ms(ts_text), text_or_empty(session) or file.session_id
    if not session or ts is None:
        return "no session or time"
    if not isinstance(figures, dict):
        return "no usage"
    names = HISTORY_TOKEN_NAMES[file.agent]
    attrs = {names[key]: value for key, value in figures.items() if key in names} if names else figures
    try:
        counts = AGENT_CALL_OF[file.agent].tokens(attrs)
        check_call_tokens(counts)
    except BadValue:
        return FIGURES_OUT_OF_RANGE
    return TranscriptEntry(session, ts, text_or_empty(model) or file.model or "unknown", *counts, 0,
                           text_or_empty(request_id), text_or_empty(message_id), file.project, None, agent=file.agent)


def gemini_history(file: HistoryFile, data: dict) -> Iterator[TranscriptEntry | str]:
    """A Gemini CLI chat line: its header (the session), a message, or a patch ($set) that may hold messages. A
    model message is written again as it gains its tool calls: the importer counts its id once."""
    if "$set" not in data and "kind" in data and "sessionId" in data:
        file.session_id = text_or_empty(data["sessionId"])
        return
    patch = data.get("$set")
    messages = patch.get("messages") if isinstance(patch, dict) else [data]
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict) and message.get("type") == "gemini" and "tokens" in message:
            yield history_call(file, message.get("timestamp"), "", message.get("model"), message["tokens"],
                               message_id=message.get("id"))


def codex_limit_window(window: Any) -> LimitWindow | None:
    """One of Codex's rate_limits windows ({used_percent, window_minutes, resets_at: seconds}), or None."""
    if not isinstance(window, dict):
        return None
    percent, resets = window.get("used_percent"), window.get("resets_at")
    if type(percent) not in (int, float) or type(resets) is not int:
        return None
    return LimitWindow(float(percent), resets * 1000)


def codex_history(file: HistoryFile, data: dict) -> Iterator[TranscriptEntry | LimitReading | str]:
    """A Codex rollout line: session_meta (the conversation, its folder), turn_context (the model), a
    token_usage_record (one response's usage, with its response_id), or a token_count event, whose rate_limits
    are Codex's plan's own: its primary (5-hour) and secondary (weekly) windows."""
    kind, payload = data.get("type"), data.get("payload")
    if not isinstance(payload, dict):
        return
    if kind == "session_meta":
        file.session_id = text_or_empty(payload.get("id")) or file.session_id
        file.project = text_or_empty(payload.get("cwd")) or file.project
    elif kind == "turn_context":
        file.model = text_or_empty(payload.get("model")) or file.model
    elif kind == "token_usage_record":
        yield history_call(file, data.get("timestamp"), payload.get("session_id"), "", payload.get("usage"),
                           request_id=payload.get("response_id"))
    elif kind == "event_msg" and payload.get("type") == "token_count" and isinstance(payload.get("rate_limits"), dict):
        limits, ts = payload["rate_limits"], parse_iso_ms(data.get("timestamp"))
        five_hour, seven_day = codex_limit_window(limits.get("primary")), codex_limit_window(limits.get("secondary"))
        if file.session_id and ts is not None and (five_hour or seven_day):
            reading = LimitReading(file.session_id, ts, file.project, file.model, five_hour=five_hour,
                                   seven_day=seven_day, agent=CODEX)
            yield LIMITS_OUT_OF_RANGE if agent_reading_problem(reading, now_ms()) else reading


def qwen_history(file: HistoryFile, data: dict) -> Iterator[TranscriptEntry | str]:
    """A Qwen Code chat line: a ui_telemetry system line embeds its qwen-code.api_response event as sent."""
    payload = data.get("systemPayload")
    event = payload.get("uiEvent") if data.get("subtype") == "ui_telemetry" and isinstance(payload, dict) else None
    if isinstance(event, dict) and event.get("event.name") == "qwen-code.api_response":
        file.project = text_or_empty(data.get("cwd")) or file.project
        yield history_call(file, event.get("event.timestamp") or data.get("timestamp"), data.get("sessionId"),
                           event.get("model"), event, request_id=event.get("response_id"))


HISTORY_READERS = {GEMINI_CLI: gemini_history, CODEX: codex_history, QWEN_CODE: qwen_history}


def history_entries(file: HistoryFile, line: str) -> list[TranscriptEntry | LimitReading | str]:
    """The calls of one line of an agent's history, and the reasons some are skipped ('not JSON', ...)."""
    if not line.strip():
        return []
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        return ["not JSON"]
    return list(HISTORY_READERS[file.agent](file, data)) if isinstance(data, dict) else ["not JSON"]


def history_roots(environ: dict[str, str], home: Path) -> dict[Path, str]:
    """Where each agent keeps its history, by agent: Claude Code's transcripts (transcript_roots), Gemini CLI's
    chats (~/.gemini/tmp/*/chats), Codex's rollouts ($CODEX_HOME/sessions, else ~/.codex/sessions) and Qwen
    Code's chats (~/.qwen/projects/*/chats)."""
    codex_home = Path(environ["CODEX_HOME"]).expanduser() if environ.get("CODEX_HOME", "").strip() \
        else home / ".codex"
    return {**dict.fromkeys(transcript_roots(environ, home), CLAUDE_CODE), home / ".gemini" / "tmp": GEMINI_CLI,
            codex_home / "sessions": CODEX, home / ".qwen" / "projects": QWEN_CODE}


def history_agent(path: Path, roots: dict[Path, str]) -> str:
    """Whose file this is: the agent of the default folder it is in, else by how each agent names its files
    (Codex's rollout-*.jsonl, Gemini's chats/session-*.jsonl, Qwen's chats/*.jsonl; the rest are Claude Code's)."""
    for root, agent in roots.items():
        if path == root or root in path.parents:
            return agent
    if path.name.startswith("rollout-"):
        return CODEX
    if path.parent.name == "chats":
        return GEMINI_CLI if path.name.startswith("session-") else QWEN_CODE
    return CLAUDE_CODE


def transcript_roots(environ: dict[str, str], home: Path) -> list[Path]:
    """Where Claude Code keeps transcripts: $CLAUDE_CONFIG_DIR/projects (a comma-separated list of folders is
    accepted), else ~/.claude/projects and ~/.config/claude/projects."""
    if environ.get("CLAUDE_CONFIG_DIR", "").strip():
        return [Path(folder.strip()).expanduser() / "projects"
                for folder in environ["CLAUDE_CONFIG_DIR"].split(",") if folder.strip()]
    return [home / ".claude" / "projects", home / ".config" / "claude" / "projects"]


def resource_user(environ: dict[str, str]) -> str:
    """user.email in OTEL_RESOURCE_ATTRIBUTES (key=value pairs, comma-separated), else ''."""
    for pair in environ.get(OTEL_RESOURCE_ENV, "").split(","):
        key, _, value = pair.partition("=")
        if key.strip() == "user.email":
            return unquote(value.strip())
    return ""


MAX_LINE_BYTES = 32 * 2 ** 20  # a longer transcript line is skipped (named), never held in memory whole
READ_BLOCK = 2 ** 20          # transcripts are read this much at a time (less than MAX_LINE_BYTES: a line too long
                              # spans blocks)
FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))  # what a path named *.jsonl may be instead


class NotTranscript(OSError):
    """A path named like a transcript that is no regular file (a FIFO would block the reading for ever)."""


class TranscriptFiles:
    """The .jsonl files under some folders, each read line by line from where the last read stopped: only complete
    lines, so a line Claude Code is still writing is read once it is whole."""

    def __init__(self, roots: list[Path]):
        self.roots = roots
        self.positions: dict[Path, tuple[int, int]] = {}  # bytes and lines read
        self.unreadable_folders: dict[Path, str] = {}  # found by the last walk, with the reason
        self.sizes: dict[Path, int] = {}  # of the files the last walk found, as it found them
        self._paths: dict[str, Path] = {}  # each file's Path, made once (--follow walks every second)

    def paths(self) -> list[Path]:
        """Every *.jsonl under the roots (a root may be one), the most recently written first: a first reading of a
        year of them shows the current figures first. The walk keeps its folders in a list, not in recursion, and
        enters a folder once however many links lead to it."""
        found: dict[Path, int] = {}  # -> when last written (0: unknown)
        folders, entered = [], set()
        self.unreadable_folders, self.sizes = {}, {}
        for root in self.roots:
            if root.is_dir():
                folders.append(root)
            elif root.exists() or root.is_symlink():
                try:
                    found[root] = root.stat().st_mtime_ns  # no size kept: a root is looked at every time
                except OSError:
                    found[root] = 0  # a link to nowhere: lines() says why
        while folders:
            folder = folders.pop()
            try:
                info = folder.stat()
                if (info.st_dev, info.st_ino) in entered:
                    continue
                entered.add((info.st_dev, info.st_ino))
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if entry.name.endswith(".jsonl"):
                            path = self._paths.get(entry.path) or self._paths.setdefault(entry.path, Path(entry.path))
                            try:
                                look = entry.stat()  # the one look a --follow pass takes at a file it has read
                                found[path], self.sizes[path] = look.st_mtime_ns, look.st_size
                            except OSError:
                                found[path] = 0  # gone, or a link to nowhere: lines() says why
                        try:
                            if entry.is_dir():
                                folders.append(Path(entry.path))
                        except OSError:
                            continue  # gone, or a link to nowhere
            except FileNotFoundError:
                continue  # gone since it was listed
            except OSError as exc:
                self.unreadable_folders[folder] = exc.strerror or str(exc)
        return sorted(found, key=lambda path: (-found[path], path))

    def unchanged(self, path: Path) -> bool:
        """Whether the file was read before and, when the last walk found it, was as long as what was read."""
        return path in self.positions and self.positions[path][0] == self.sizes.get(path)

    def lines(self, path: Path, final: bool) -> Iterator[tuple[int, str | None, bool]]:
        """(line number, text, whole) of each new complete line; text None for a line over MAX_LINE_BYTES (skipped
        unread). With `final`, a last line without its newline too (whole False), else it waits for its newline.
        Raises OSError for a file that cannot be read, NotTranscript for one that is no regular file."""
        offset, number = self.positions.get(path, (0, 0))
        if offset and os.stat(path).st_size == offset:
            return  # nothing new (--follow looks at every file every second)
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO's open waits for a writer
        try:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                kind = next((kind for is_kind, kind in FILE_KINDS if is_kind(info.st_mode)), "of an unknown kind")
                raise NotTranscript(f"not a regular file: {kind}")
            handle = open(descriptor, "rb")
        except BaseException:
            os.close(descriptor)
            raise
        with handle:
            if info.st_size < offset:  # rewritten from the start
                offset = number = 0
                self.positions[path] = offset, number  # so far, even when it is empty now
            handle.seek(offset)
            held: list[bytes] | None = []  # the line read so far, until its newline; None: too long, not kept
            size = 0  # of that line
            while block := handle.read(READ_BLOCK):
                first_end = block.find(b"\n")
                if first_end >= 0:  # the held line ends
                    last_end = block.rindex(b"\n")
                    size += first_end
                    number += 1
                    yield number, None if held is None or size > MAX_LINE_BYTES else \
                        (b"".join(held) + block[:first_end] if held else block[:first_end]).decode(
                            "utf-8", errors="replace"), True
                    if last_end > first_end:  # the block's other whole lines (shorter than it), decoded at once
                        for text in block[first_end + 1:last_end].decode("utf-8", errors="replace").split("\n"):
                            number += 1
                            yield number, text, True
                    offset += size + 1 + last_end - first_end
                    held, size, block = [], 0, block[last_end + 1:]
                self.positions[path] = offset, number  # a block's lines are read: a read error comes after them
                size += len(block)
                if held is not None and block:
                    held.append(block)
                    if size > MAX_LINE_BYTES:
                        held = None
            if size and final:  # a last line without its newline
                self.positions[path] = offset + size, number + 1
                yield number + 1, None if held is None else b"".join(held).decode("utf-8", errors="replace"), False


@dataclasses.dataclass
class ImportTally:
    entries: int = 0        # assistant messages with usage, once each
    imported: int = 0
    known: int = 0
    duplicates: int = 0     # the same message written again (streaming)
    before_since: int = 0
    estimated: int = 0      # of those imported (or to import), priced by ccmon's table
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    unknown_models: dict[str, int] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)
    agents: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # agent -> [files, imported, known]
    readings: int = 0       # other agents' limit readings stored

    def of_agent(self, agent: str) -> list[int]:
        return self.agents.setdefault(agent, [0, 0, 0])

    @property
    def files(self) -> int:
        """The files read (up to an error, if any), every agent's."""
        return sum(files for files, _, _ in self.agents.values())


def import_summary(tally: ImportTally, dry_run: bool) -> str:
    """The one line `ccmon import` ends with."""
    skipped = sum(tally.skipped.values())
    parts = [f"{tally.files:,} file{'s' * (tally.files != 1)} read",
             f"{tally.imported:,} request{'s' * (tally.imported != 1)} {'to import' if dry_run else 'imported'}",
             f"{tally.known:,} already known",
             f"{skipped:,} skipped" + (" (" + ", ".join(f"{n:,} {reason}" for reason, n in
                                                         sorted(tally.skipped.items())) + ")" if skipped else "")]
    if tally.duplicates:
        parts.append(f"{tally.duplicates:,} streaming duplicates counted once")
    if tally.before_since:
        parts.append(f"{tally.before_since:,} before --since")
    if tally.estimated:
        parts.append(f"{tally.estimated:,} priced by ccmon (estimated)")
    if tally.unknown_models:
        parts.append("unknown models counted at $0: " + ", ".join(f"{model} ({n:,})" for model, n in
                                                                   sorted(tally.unknown_models.items())))
    if tally.readings:
        parts.append(f"{plural(tally.readings, 'limit reading')} of Codex stored")
    if set(tally.agents) - {CLAUDE_CODE}:  # what was read of each agent, once other agents' histories were
        parts.append("by agent: " + ", ".join(
            f"{agent} ({plural(files, 'file')}, {imported:,} {'to import' if dry_run else 'imported'}, {known:,} known)"
            for agent in AGENTS if agent in tally.agents for files, imported, known in [tally.agents[agent]]))
    return ("ccmon import (dry run): " if dry_run else "ccmon import: ") + "; ".join(parts)


class Importer:
    """Reads transcripts and sends their requests in batches; counts everything it reads for the summary."""

    def __init__(self, client: Client, config: Config, user: str, since_ms: int | None, dry_run: bool,
                 progress: Any | None = None, roots: dict[Path, str] | None = None):
        self.client, self.user, self.since_ms, self.dry_run = client, user, since_ms, dry_run
        self.roots = roots or {}  # the default folders, by agent (see history_agent)
        self.histories: dict[Path, HistoryFile] = {}  # the other agents' files read
        self.files_read: set[Path] = set()
        self.readings: list[LimitReading] = []  # other agents' limit readings, sent at each flush
        self.prices = config.prices
        self.tally = ImportTally()
        self.seen: set[str] = set()  # the answer_key of each answer read
        # requests to send (with the file and line they are read from), apart by whether ccmon priced them and by
        # agent: the server's count of a batch's imported requests is then also the count of those priced by ccmon
        # among them, and of that agent's
        self.pending: dict[tuple[bool, str], list[tuple[ccmon_pb2.ImportedRequest, Path | str, int]]] = {}
        self.prices_found: dict[str, Price | None] = {}
        self.unreadable: set[Path] = set()
        # the batches read are stored while the next is read: the server and the reading run on two cores
        self.sender = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccmon-import")
        self.in_flight: collections.deque[tuple[futures.Future, list, tuple[bool, str]]] = collections.deque()
        self.batch = FIRST_IMPORT_BATCH  # the size of the next call
        # requests of the call that failed last and of those sent after it: stored or not, the server did not say
        self.unconfirmed = 0
        self.progress, self.started, self.shown = progress, time.monotonic(), 0.0

    def skip(self, reason: str, where: str = "") -> None:
        """Count a skipped line or file; `where` (file:line) names it, the first NAMED_PER_REASON of a reason."""
        self.tally.skipped[reason] = self.tally.skipped.get(reason, 0) + 1
        if where and self.tally.skipped[reason] <= NAMED_PER_REASON:
            self.tally.problems.append(f"{reason}: {where}")

    def add(self, lines: Iterable[tuple[int, str | None, bool]], path: Path | str) -> None:
        """A file's lines, as TranscriptFiles.lines reads them."""
        agent = history_agent(Path(path), self.roots)
        if agent != CLAUDE_CODE:
            self.add_history(lines, path, self.histories.setdefault(Path(path), HistoryFile(agent)))
            return
        for number, line, whole in lines:
            if line is None:
                self.skip("line too long", f"{path}:{number}")
                continue
            if not whole and transcript_entry(line) == "not JSON":  # Claude Code may be writing it: read it later
                self.skip("truncated last line", f"{path}:{number}")
                continue
            if '"requestId":"' in line:
                ids = ANSWER_IDS.search(line)
                if ids and answer_key(*ids.groups()) in self.seen:
                    self.tally.duplicates += 1
                    continue
            found = transcript_entry(line)
            if found is not None:
                self.take(found, path, number)

    def add_history(self, lines: Iterable[tuple[int, str | None, bool]], path: Path | str, file: HistoryFile) -> None:
        """Another agent's history file's lines, as TranscriptFiles.lines reads them."""
        for number, line, whole in lines:
            if line is None:
                self.skip("line too long", f"{path}:{number}")
                continue
            found = history_entries(file, line)
            if not whole and found == ["not JSON"]:  # the agent may be writing it: read it later
                self.skip("truncated last line", f"{path}:{number}")
                continue
            for each in found:
                self.take(each, path, number)

    def take(self, found: TranscriptEntry | LimitReading | str, path: Path | str, number: int) -> None:
        """One call read (or an agent's limit reading, or the reason a line is skipped): counted once, sent in its
        batch."""
        if isinstance(found, LimitReading):
            self.readings.append(found)
            return
        if isinstance(found, str):
            self.skip(found, f"{path}:{number}" if found in NAMED_REASONS else "")
            return
        key = found.key if found.message_id or found.request_id else answer_key(found.session_id, str(found.ts_ms))
        if key in self.seen:
            self.tally.duplicates += 1
            return
        self.seen.add(key)
        if found.ts_ms > now_ms() + DATED_AHEAD_MS:  # it would be the newest request for years
            self.skip(DATED_AHEAD, f"{path}:{number}")
            return
        if self.since_ms is not None and found.ts_ms < self.since_ms:
            self.tally.before_since += 1
            return
        if found.model not in self.prices_found:
            self.prices_found[found.model] = price_of(found.model, self.prices)
        request, priced = imported_request(found, self.prices, self.prices_found[found.model])
        if request.cost_nanos > MAX_USD * NANOS_PER_USD:  # the server refuses it: more than one call can cost
            self.skip(FIGURES_OUT_OF_RANGE, f"{path}:{number}")
            return
        self.tally.entries += 1
        if not priced:
            self.tally.unknown_models[found.model] = self.tally.unknown_models.get(found.model, 0) + 1
        batch = (request.estimated and priced, found.agent)
        self.pending.setdefault(batch, []).append((request, path, number))
        if len(self.pending[batch]) >= self.batch:
            self.send(batch)

    def add_file(self, files: TranscriptFiles, path: Path, final: bool) -> None:
        if files.unchanged(path):  # most files at each look of --follow: nothing to do
            return
        try:
            self.add(files.lines(path, final), path)
        except OSError as exc:
            if path in files.positions:  # its lines up to the error are read
                self.count_file(path)
            self.unreadable_path(path, exc.strerror or str(exc), "unreadable file")
            return
        self.count_file(path)
        self.show_progress()

    def count_file(self, path: Path) -> None:
        """Count a file among those read, once."""
        if path not in self.files_read:
            self.files_read.add(path)
            self.tally.of_agent(history_agent(path, self.roots))[0] += 1

    def unreadable_path(self, path: Path, reason: str, kind: str) -> None:
        if path not in self.unreadable:  # named once, however often --follow tries again
            self.unreadable.add(path)
            self.tally.problems.append(f"unreadable: {path} ({reason})")
            self.skip(kind)

    def transcript_paths(self, files: TranscriptFiles) -> list[Path]:
        paths = files.paths()
        for folder, reason in files.unreadable_folders.items():
            self.unreadable_path(folder, reason, "unreadable folder")
        return paths

    def flush(self, wait: bool = False) -> None:
        """Send what is read (in the background, after the batch before it is stored); with `wait`, until all is
        stored. A batch that could not be sent is kept for the next flush."""
        for batch in list(self.pending):
            self.send(batch)
        if wait:
            self.collect()
        if self.readings and not self.dry_run:  # with the requests they come with stored first
            self.collect()
            self.tally.readings += self.client.import_requests([], self.user, readings=self.readings).readings
            self.readings = []

    def send(self, kind: tuple[bool, str]) -> None:
        """Send the requests read of a kind: (priced by ccmon, agent); first wait for the answer to the oldest call
        when IMPORT_CALLS_AHEAD are unanswered."""
        if self.pending.get(kind):
            while len(self.in_flight) >= IMPORT_CALLS_AHEAD:
                self.collect_oldest()  # should it fail, what is read stays pending
            batch, self.pending[kind] = self.pending[kind], []
            self.in_flight.append((self.sender.submit(self.client.import_requests,
                                                      [request for request, *_ in batch], self.user, self.dry_run),
                                   batch, kind))
            self.batch = min(self.batch * 2, IMPORT_BATCH)

    def collect(self) -> None:
        """Wait for the answers to every call sent."""
        while self.in_flight:
            self.collect_oldest()

    def collect_oldest(self) -> None:
        future, batch, kind = self.in_flight.popleft()
        try:
            try:
                self.count(future.result(), kind)
            except ImportRefused as exc:
                self.send_apart(batch, kind, exc)
        except ServerUnreachable:  # kept for --follow's next try: what is stored of it is then known
            self.pending.setdefault(kind, [])[:0] = batch
            self.unconfirmed = len(batch) + sum(len(later) for _, later, _ in self.in_flight)  # sent after it
            raise

    def close(self) -> None:
        """Close the client, then end the sender: the connection closed first, a call still under way (after one
        that failed) ends now, not at its deadline; one not started is cancelled."""
        self.client.close()
        self.sender.shutdown(wait=True, cancel_futures=True)

    def count(self, counts: ImportCounts, kind: tuple[bool, str]) -> None:
        estimated, agent = kind
        self.tally.imported += counts.imported
        self.tally.known += counts.already_known
        self.tally.estimated += counts.imported if estimated else 0
        of_agent = self.tally.of_agent(agent)
        of_agent[1] += counts.imported
        of_agent[2] += counts.already_known

    def send_apart(self, batch: list[tuple[ccmon_pb2.ImportedRequest, Path | str, int]], kind: tuple[bool, str],
                   refused: ImportRefused) -> None:
        """A batch the server refused (it stores all of a batch or nothing): sent again in halves, until each
        request it refuses is alone, and named; the others are stored."""
        if len(batch) == 1:
            _, path, number = batch[0]
            self.tally.entries -= 1
            self.skip("refused by the server", f"{path}:{number} ({refused})")
            return
        for half in (batch[:len(batch) // 2], batch[len(batch) // 2:]):
            try:
                self.count(self.client.import_requests([request for request, *_ in half], self.user, self.dry_run),
                           kind)
            except ImportRefused as exc:
                self.send_apart(half, kind, exc)

    def show_progress(self, files_total: int = 0, done: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if done:
            self.progress.write("\r\033[K")
        elif now - self.shown >= PROGRESS_EVERY_S:
            self.shown = now
            rate = self.tally.entries / max(now - self.started, 1e-6)
            total = f"/{files_total:,}" if files_total else ""
            filled = round(20 * self.tally.files / files_total) if files_total else 0
            gauge = f"[{'#' * filled}{'.' * (20 - filled)}] " if files_total else ""
            self.progress.write(f"\r\033[Kccmon import: {gauge}{self.tally.files:,}{total} files, "
                                f"{self.tally.entries:,} entries, {rate:,.0f}/s")
        self.progress.flush()


def run_import(config: Config, args: argparse.Namespace, environ: dict[str, str] | None = None) -> int:
    """ccmon import [PATH ...]: every request of Claude Code's transcripts and the other agents' histories, sent to
    the server once."""
    environ = dict(os.environ) if environ is None else environ
    defaults = {} if args.paths else history_roots(environ, Path.home())
    roots = [Path(p).expanduser() for p in args.paths] or list(defaults)
    missing = [root for root in roots if not root.exists()]
    if len(missing) == len(roots):
        claude = [root for root in roots if defaults.get(root, CLAUDE_CODE) == CLAUDE_CODE]
        others = [root for root in roots if root not in claude]
        print(f"ccmon import: no Claude Code transcripts in {' or '.join(map(str, claude))}"
              + (f" nor other agents' histories in {', '.join(map(str, others))}" if others else "")
              + " (name their folder: ccmon import PATH)", file=sys.stderr)
        return 1
    since = parse_day(args.since, "--since")
    since_ms = ms_from_datetime(dt.datetime.combine(since, dt.time(), config.zone)) if since else None
    user = args.user if args.user is not None else resource_user(environ)
    stop = threading.Event()
    if args.follow:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    client = Client.for_config(config, timeout_s=IMPORT_TIMEOUT_S, go_extras_empty=False)
    importer = Importer(client, config, user, since_ms, args.dry_run,
                        sys.stderr if sys.stderr.isatty() and not args.follow else None, defaults)
    files = TranscriptFiles(roots)
    for root in missing if args.paths else ():  # of the default folders, those Claude Code does not use
        importer.tally.problems.append(f"unreadable: {root} (no such file or folder)")
        importer.skip("unreadable file")
    try:
        paths = importer.transcript_paths(files)
        for path in paths:
            importer.add_file(files, path, final=not args.follow)
            importer.show_progress(len(paths))
            if stop.is_set():
                break
        importer.flush(wait=True)
        importer.show_progress(done=True)
        failing = False
        while args.follow and not stop.wait(FOLLOW_POLL_S):
            try:
                for path in importer.transcript_paths(files):
                    importer.add_file(files, path, final=False)
                importer.flush(wait=True)
                failing = False
            except ServerUnreachable as exc:  # keep what is read and try again at the next poll
                if not failing:
                    print(f"ccmon import: {exc}; retrying", file=sys.stderr)
                failing = True
    except ServerUnreachable as exc:
        importer.show_progress(done=True)
        failure = exc
    else:
        failure = None
    finally:
        importer.close()
    for problem in importer.tally.problems:
        print(f"ccmon import: {problem}", file=sys.stderr)
    for reason, count in sorted(importer.tally.skipped.items()):
        if reason in NAMED_REASONS and count > NAMED_PER_REASON:
            print(f"ccmon import: {reason}: {count - NAMED_PER_REASON:,} more lines", file=sys.stderr)
    if failure is not None:  # a call that failed may have been stored, in part or whole, before its answer was lost
        print(f"ccmon import: stopped: {failure}. The {importer.unconfirmed:,} requests sent last may be stored "
              "already (not counted below); importing again counts each request once.", file=sys.stderr)
    print(import_summary(importer.tally, args.dry_run), flush=True)
    return 0 if failure is None else 1


# ---------------------------------------------------------------- Local server: started on demand, detached, following the transcripts

LOCAL_SERVER_START_S = 20.0          # how long a client waits for the server it started to be ready
LOCAL_SERVER_STOP_S = SHUTDOWN_S + 2  # `ccmon server stop`: the server's own shutdown, and a margin
LOCAL_SERVER_POLL_S = 0.05           # how often a start or a stop is looked at
ANOTHER_SERVER = "another ccmon server"  # the start of the message of a server that lost the database's lock


@dataclasses.dataclass(frozen=True)
class RunningServer:
    """What a server writes to its pid file once it is ready: who it is and where it listens."""
    pid: int
    address: str
    http_address: str      # '' when OTLP/HTTP is off
    database: str
    started_ms: int


def pid_file_path(config: Config) -> Path:
    """Next to the database, which one server at a time writes, named after it: ~/.ccmon/ccmon.pid."""
    return config.database_path.with_name(config.database_path.stem + ".pid")


def server_log_path(config: Config) -> Path:
    """Where a server started on demand writes its log: ~/.ccmon/server.log."""
    return config.database_path.parent / "server.log"


def is_local_server(config: Config) -> bool:
    """This machine's own server, for its user: the default database, a loopback address, auto-start on. It reads
    the user's transcripts; a team server (any other) does not."""
    return (config.monitor_autostart and is_loopback(config.server_address)
            and config.database_path == default_database_path())


def process_alive(pid: int) -> bool:
    """Whether a process runs (a zombie, ended but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's: alive
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): kill(0) has said it runs


def running_server(config: Config) -> RunningServer | None:
    """The server of this configuration's database, from its pid file, while its process runs."""
    try:
        server = RunningServer(**json.loads(pid_file_path(config).read_text()))
    except (OSError, ValueError, TypeError):
        return None  # none, or not a pid file of this release: no server known
    return server if process_alive(server.pid) else None


def write_pid_file(path: Path, server: RunningServer) -> None:
    """Whole or not at all (a reader never sees half of it), readable by its user only."""
    write_atomically(path, json.dumps(dataclasses.asdict(server)).encode(), 0o600)


def follow_transcripts(config: Config, stop: threading.Event, service: QueryService) -> None:
    """What `ccmon import --follow` does, inside the local server: Claude Code's transcripts and the other agents'
    histories read at start and followed, each request stored once (joined to its telemetry, see docs/import.md).
    The first reading (newest files first) is shown as the service's history_reading until every file read is
    stored (or the reading failed). Problems are logged, never fatal."""
    own = client_config(dataclasses.replace(config, monitor_server_given=False))
    client = Client.for_config(own, timeout_s=IMPORT_TIMEOUT_S, go_extras_empty=False)
    defaults = history_roots(dict(os.environ), Path.home())
    roots = list(defaults)
    importer = Importer(client, config, resource_user(dict(os.environ)), None, False, roots=defaults)
    files = TranscriptFiles(roots)
    log.info("transcripts: following %s", " and ".join(map(str, roots)))
    reported, failing, first = (0, 0, 0), "", True
    broken: set[Path] = set()  # files whose reading failed on a bug of ccmon's: logged once, not read again
    try:
        while True:
            try:
                paths = importer.transcript_paths(files)
                for number, path in enumerate(paths):
                    if first:  # until what it read is stored whole
                        service.history_reading = HistoryReading(number, len(paths))
                    if path in broken:
                        continue
                    try:
                        importer.add_file(files, path, final=False)
                    except ServerUnreachable:
                        raise
                    except Exception:  # a bug must not leave the files after this one unread
                        broken.add(path)
                        log.exception("transcripts: reading %s failed; the other files are read on, this one "
                                      "again once the server restarts", path)
                importer.flush(wait=True)
                failing = ""
            except ServerUnreachable as exc:  # kept and tried again at the next look, as --follow does
                if str(exc) != failing:
                    log.warning("transcripts: %s; retrying", exc)
                failing = str(exc)
            except Exception as exc:  # a bug must not stop the server that stores the telemetry
                log.error("transcripts: %s: %s; retrying", type(exc).__name__, exc)
            if first:  # read and stored, or failed (logged, tried again as what follows): no longer under way
                service.history_reading, first = None, False
            tally = importer.tally
            for problem in tally.problems:
                log.warning("transcripts: %s", problem)
            tally.problems.clear()
            if (len(files.positions), tally.imported, tally.known) != reported:
                reported = (len(files.positions), tally.imported, tally.known)
                log.info("transcripts: %d files read, %d requests imported, %d already known", *reported)
            if stop.wait(FOLLOW_POLL_S):
                return
    finally:
        importer.close()


def serve(config: Config) -> int:
    """ccmon --server: the server, its pid file written once it is ready (removed when it stops), and for the
    local server the transcripts followed."""
    path = pid_file_path(config)

    def ready(service: QueryService, port: int, http_port: int, stop: threading.Event) -> None:
        host = config.server_address.rsplit(":", 1)[0]
        http_host = (config.server_http_address or "").rsplit(":", 1)[0]
        if is_local_server(config):  # said before the pid file tells a client the server is ready
            service.history_reading = HistoryReading(0, 0)
        try:
            write_pid_file(path, RunningServer(os.getpid(), f"{host}:{port}", f"{http_host}:{http_port}" if http_port
                                               else "", str(config.database_path), now_ms()))
        except OSError as exc:
            log.error("cannot write the pid file %s: %s (ccmon server status and stop will not find this server)",
                      path, exc.strerror)
        if is_local_server(config):
            threading.Thread(target=follow_transcripts, args=(config, stop, service), name="ccmon-transcripts",
                             daemon=True).start()

    try:
        return run_server(config, on_ready=ready, pages=lambda service: {
            **dashboard_pages(config, service.reader, lambda: service.history_reading),
            **metrics_pages(config, service.reader),
            **status_line_pages(config, service), **quick_query_pages(service, config.server_token)})
    finally:
        with contextlib.suppress(OSError, ValueError, TypeError):
            if json.loads(path.read_text())["pid"] == os.getpid():  # not another server's, after a failed start
                path.unlink()


def program_path() -> Path:
    """This program: the ccmon.pyz whose __main__.py runs (it imports ccmon.py from its unpacked cache), else
    ccmon.py."""
    main_file = Path(getattr(sys.modules.get("__main__"), "__file__", None) or __file__)
    return main_file.parent if main_file.parent.is_file() else Path(__file__).resolve()


def start_detached_server(config: Config) -> tuple[Any, int]:
    """`ccmon --server` (with this configuration's file) in a session of its own, detached from the terminal like
    tmux's server; its output appended to server.log. Returns the process and where its log started."""
    import subprocess
    log_path = server_log_path(config)
    log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    offset = os.fstat(descriptor).st_size
    # It runs in its log's folder: the files it is named are named whole. A setting with a variable goes by it
    # (a token is not shown to `ps` for as long as the server runs).
    command = [sys.executable, str(program_path()), "--server"]
    command += ["--config", os.path.abspath(config.source)] if config.source != "defaults" else []
    environment = dict(os.environ)
    for setting, value in config.server_flags:
        if setting.env:
            environment[setting.env] = value
        else:
            command += [setting.options[-1], value]
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=descriptor, stderr=descriptor,
                                   close_fds=True, start_new_session=True, cwd=log_path.parent, env=environment)
    except OSError as exc:
        raise ServerError(f"cannot start the local server: {exc.strerror or exc}") from None
    finally:
        os.close(descriptor)
    return process, offset


def log_since(path: Path, offset: int) -> str:
    """What a log holds after `offset`: the lines of the servers started since ('' when unreadable)."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except OSError:
        return ""


def wait_for_started_server(config: Config, process: Any, log_offset: int) -> RunningServer:
    """The server ready, by its pid file: the one just started, or, when it lost the database's lock to another
    started at the same moment, that other one. ServerError with its log's last line when none is ready in time."""
    deadline = time.monotonic() + LOCAL_SERVER_START_S
    while time.monotonic() < deadline:
        server = running_server(config)
        if server is not None and (server.pid == process.pid or process.poll() is not None):
            return server
        if process.poll() is not None and ANOTHER_SERVER not in log_since(server_log_path(config), log_offset):
            break  # it failed for a reason of its own: no other server to wait for
        time.sleep(LOCAL_SERVER_POLL_S)
    lines = log_since(server_log_path(config), log_offset).strip().splitlines()
    said = f": {lines[-1]}" if lines else ""
    raise ServerError(f"the local server did not start{said} (its log: {server_log_path(config)})")


def start_local_server_if_needed(config: Config, wait: bool = True) -> str:
    """For a client of this configuration (as client_config makes it): when it names no server, auto-start is on
    and nothing answers at the local address, start the local server; returns what to tell the user ('' when
    nothing was started). With wait=False (the status line, within Claude Code's patience) the start is not
    waited for."""
    if config.monitor_server_given or not config.monitor_autostart:
        return ""
    probe = Client.for_config(config, timeout_s=2.0 if wait else config.status_line_wait_s)
    try:
        probe.server_info()
        return ""
    except ServerUnreachable as exc:
        if str(exc) != "connection refused":
            return ""  # something answers there: the client's own call says what is wrong with it
    finally:
        probe.close()
    process, log_offset = start_detached_server(config)
    if not wait:
        return f"local server starting, pid {process.pid}"
    return f"local server started, pid {wait_for_started_server(config, process, log_offset).pid}"


def run_server_command(config: Config, action: str) -> int:
    """ccmon server status|stop: the server of this configuration's database, found by its pid file."""
    server = running_server(config)
    if server is None:
        print(f"ccmon server: not running (no live pid in {pid_file_path(config)})")
        return 1 if action == "status" else 0
    if action == "status":
        since = dt.datetime.fromtimestamp(server.started_ms / 1000, config.zone).isoformat(timespec="seconds")
        print(f"ccmon server: running, pid {server.pid}\n  gRPC:     {server.address}\n"
              f"  OTLP/HTTP: {server.http_address or 'off'}\n  database: {server.database}\n"
              f"  log:      {server_log_path(config)}\n  up since: {since}")
        return 0
    try:
        os.kill(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    except PermissionError:
        print(f"ccmon server: pid {server.pid} is not yours to stop", file=sys.stderr)
        return 1
    deadline = time.monotonic() + LOCAL_SERVER_STOP_S
    while process_alive(server.pid):
        if time.monotonic() > deadline:
            print(f"ccmon server: pid {server.pid} has not stopped after {LOCAL_SERVER_STOP_S} s (its log: "
                  f"{server_log_path(config)})", file=sys.stderr)
            return 1
        time.sleep(LOCAL_SERVER_POLL_S)
    print(f"ccmon server: stopped pid {server.pid}")
    return 0


# ---------------------------------------------------------------- Setup: ccmon setup, agents' settings pointed at ccmon

SETUP_BACKUP_SUFFIX = ".ccmon-backup"  # next to the settings file: its content before ccmon setup first changed it
CCMON_PROGRAM_NAMES = ("ccmon.pyz", "ccmon.py", "ccmon")  # a statusLine running one of these is ccmon's own
TELEMETRY_ENV_KEYS = ("CLAUDE_CODE_ENABLE_TELEMETRY", "OTEL_LOGS_EXPORTER", "OTEL_METRICS_EXPORTER",
                      "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_HEADERS")
NEW_SETTINGS_MODE = 0o600  # the file may hold the server's token
SETUP_TOOLS = {CLAUDE_CODE: "Claude Code", GEMINI_CLI: "Gemini CLI", CODEX: "Codex CLI", QWEN_CODE: "Qwen Code"}
# The object of each agent's settings.json that ccmon setup writes in, and what it holds (said when it is no object).
SETTINGS_BLOCKS = {CLAUDE_CODE: ("env", '{"NAME": "value"}'), GEMINI_CLI: ("telemetry", '{"enabled": true, ...}'),
                   QWEN_CODE: ("telemetry", '{"enabled": true, ...}')}
# The telemetry settings of Gemini CLI and Qwen Code that are ccmon setup's. An outfile is removed: with one, both
# write their telemetry to that file instead of exporting it (checked in Gemini CLI 0.61.0, Qwen Code 0.24.4).
TELEMETRY_SETTINGS_KEYS = ("enabled", "target", "otlpEndpoint", "otlpProtocol", "outfile")
# Codex CLI's [otel] keys that are ccmon setup's: its logs' exporter and its metrics'. Both are set: exporter
# defaults to none, metrics_exporter to statsig, which sends Codex's metrics to OpenAI (other-agents notes).
CODEX_EXPORTER_KEYS = ("exporter", "metrics_exporter")
CODEX_OTEL_TABLE = "otel"
# A TOML key as written, bare or quoted (tomllib is the judge of what it means), and the parts of a dotted one.
TOML_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
TOML_KEY = rf"{TOML_KEY_PART}(?:[ \t]*\.[ \t]*{TOML_KEY_PART})*"
TOML_HEADER = re.compile(rf"[ \t]*(\[\[?)[ \t]*({TOML_KEY})[ \t]*\]")
TOML_KEY_VALUE = re.compile(rf"[ \t]*({TOML_KEY})[ \t]*=")


class SetupError(Exception):
    """A settings file ccmon setup cannot use; the message names the file (and the line) and says why."""


def claude_settings_path(environ: dict[str, str], home: Path) -> Path:
    """Claude Code's user settings: $CLAUDE_CONFIG_DIR/settings.json, else ~/.claude/settings.json."""
    folder = environ.get("CLAUDE_CONFIG_DIR", "").strip()
    return (Path(folder).expanduser() if folder else home / ".claude") / "settings.json"


def agent_settings_path(agent: str, environ: dict[str, str], home: Path) -> Path:
    """The user settings file ccmon setup writes for the agent, where the tool reads it (Gemini CLI's
    GEMINI_CLI_HOME stands for the home folder; Qwen Code's QWEN_HOME and Codex's CODEX_HOME for the folder)."""
    if agent == CLAUDE_CODE:
        return claude_settings_path(environ, home)
    variable, default, name = {GEMINI_CLI: ("GEMINI_CLI_HOME", home, ".gemini/settings.json"),
                               QWEN_CODE: ("QWEN_HOME", home / ".qwen", "settings.json"),
                               CODEX: ("CODEX_HOME", home / ".codex", "config.toml")}[agent]
    folder = environ.get(variable, "").strip()
    return (Path(folder).expanduser() if folder else default) / name


def otlp_endpoint(config: Config) -> str:
    """The server's OTLP gRPC endpoint as the agents' exporters want it: a URL of monitor.server."""
    host, port = parse_address(config.monitor_server, fail_as=ConfigError)
    return f"{'https' if config.monitor_tls else 'http'}://{host}:{port}"


def telemetry_env(config: Config) -> dict[str, str]:
    """The env entries that make Claude Code export its telemetry to the server over OTLP gRPC."""
    env = {"CLAUDE_CODE_ENABLE_TELEMETRY": "1", "OTEL_LOGS_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "otlp",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint(config)}
    if config.monitor_token:
        env["OTEL_EXPORTER_OTLP_HEADERS"] = f"Authorization=Bearer {config.monitor_token}"
    return env


def telemetry_settings(config: Config) -> dict[str, Any]:
    """The telemetry block entries that make Gemini CLI or Qwen Code export to the server: over gRPC, their
    default and the port ccmon's own queries use (their `http` is OTLP/HTTP JSON to the HTTP listener). logPrompts
    is the user's: ccmon needs no prompt text."""
    return {"enabled": True, "target": "local", "otlpEndpoint": otlp_endpoint(config), "otlpProtocol": "grpc"}


def codex_exporter(config: Config) -> dict[str, Any]:
    """Codex CLI's exporter to the server, for its logs and its metrics alike: OTLP gRPC, with the token as the
    metadata header gRPC servers read (lower case)."""
    grpc = {"endpoint": otlp_endpoint(config)}
    if config.monitor_token:
        grpc["headers"] = {"authorization": f"Bearer {config.monitor_token}"}
    return {"otlp-grpc": grpc}


def overriding_variables(agent: str, environ: dict[str, str]) -> list[str]:
    """Notes on the variables set here that Gemini CLI or Qwen Code takes over its settings file (its own
    telemetry variables, and the endpoint of OpenTelemetry's), if it starts with this environment."""
    prefix = "GEMINI" if agent == GEMINI_CLI else "QWEN"
    names = [f"{prefix}_TELEMETRY_{name}" for name in ("ENABLED", "TARGET", "OTLP_ENDPOINT", "OTLP_PROTOCOL",
                                                        "OUTFILE")]
    return [f"{name} is set here ({environ[name]}): {SETUP_TOOLS[agent]} takes it over its settings file"
            for name in (*names, "OTEL_EXPORTER_OTLP_ENDPOINT") if environ.get(name, "").strip()]


def token_note(agent: str, config: Config) -> list[str]:
    """What to do about the token where a tool's settings cannot carry it: Gemini CLI's and Qwen Code's
    settings have no headers, and their OpenTelemetry exporters read them only from the environment."""
    if not config.monitor_token or agent not in (GEMINI_CLI, QWEN_CODE):
        return []
    command = "gemini" if agent == GEMINI_CLI else "qwen"
    return [f"the server wants a token, which {SETUP_TOOLS[agent]}'s settings cannot hold: run {command} with "
            "OTEL_EXPORTER_OTLP_HEADERS='Authorization=Bearer <token>' in its environment (your shell's profile), "
            "or the server refuses its telemetry"]


def ccmon_program() -> str:
    """This ccmon's file: the ccmon.pyz it runs from (whose bootstrap is the archive's __main__.py), else
    ccmon.py. As given, not resolved: a symlink the user made (~/bin/ccmon.pyz) stays theirs to repoint."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    archive = os.path.dirname(os.path.abspath(main_file)) if main_file else ""
    return archive if archive and os.path.isfile(archive) else os.path.abspath(__file__)


def status_line_command(config: Config, python: str, program: str, template: str | None) -> str:
    """The statusLine command: this interpreter and this ccmon by absolute path, with the server when it is
    not the default, and the line's own --format if it had one. The token goes in an assignment the shell that
    runs the command makes, never in an argument `ps` shows."""
    words = [python, program, "statusline"]
    if config.monitor_server_given:
        words += ["--monitor-server", config.monitor_server]
    if template is not None:
        words += ["--format", template]
    token = f"{TOKEN_ENV}={shlex.quote(config.monitor_token)} " if config.monitor_token else ""
    return token + shlex.join(words)


def ccmon_status_line_words(value: Any) -> list[str] | None:
    """The words after `statusline` of a statusLine that runs ccmon's statusline (from any path, so a moved
    ccmon.pyz is followed), else None."""
    command = value.get("command") if isinstance(value, dict) else None
    try:
        words = shlex.split(command) if isinstance(command, str) else []
    except ValueError:  # unbalanced quotes: not a command ccmon setup wrote
        return None
    programs = [index for index, word in enumerate(words) if Path(word).name in CCMON_PROGRAM_NAMES]
    after = words[programs[0] + 1:] if programs else []
    return after[after.index("statusline") + 1:] if "statusline" in after else None


def is_ccmon_status_line(value: Any) -> bool:
    return ccmon_status_line_words(value) is not None


def status_line_template(value: Any) -> str | None:
    """The --format of ccmon's statusLine, the user's own line, which ccmon setup keeps when it rewrites it."""
    words = ccmon_status_line_words(value) or []
    for index, word in enumerate(words):
        if word in ("-f", "--format") and index + 1 < len(words):
            return words[index + 1]
        if word.startswith("--format="):
            return word.partition("=")[2]
    return None


def read_settings_text(path: Path) -> tuple[bytes | None, str]:
    """(the file's bytes, or None when there is none; its text). SetupError for a file that cannot be read or is
    not UTF-8, naming the line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        raise SetupError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return raw, raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SetupError(f"{path} line {line}: not UTF-8 text") from None


def read_json_settings(path: Path, agent: str) -> tuple[bytes | None, dict]:
    """(the file's bytes, or None when there is none; its JSON object). SetupError for a file that is not a
    JSON object, or whose block ccmon writes in (SETTINGS_BLOCKS) is not one, naming the line."""
    raw, text = read_settings_text(path)
    if raw is None:
        return None, {}
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SetupError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except RecursionError:  # Python's JSON reader recurses, and stops before it finds an error's line
        raise SetupError(f"{path}: nested too deeply to read as JSON") from None
    tool = SETUP_TOOLS[agent]
    if not isinstance(settings, dict):
        start = text.count("\n", 0, len(text) - len(text.lstrip())) + 1
        raise SetupError(f"{path} line {start}: not a JSON object ({tool}'s settings are one {{...}})")
    block, shape = SETTINGS_BLOCKS[agent]
    if not isinstance(settings.get(block, {}), dict):
        raise SetupError(f"{path}: \"{block}\" is not a JSON object ({tool}'s {block} is {shape})")
    return raw, settings


def read_codex_config(path: Path) -> tuple[bytes | None, str, dict]:
    """(the file's bytes, or None when there is none; its text; its TOML document). SetupError for a file that is
    not TOML, naming the line, or whose otel is not a table."""
    raw, text = read_settings_text(path)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.fullmatch(r"(.*) \(at (?:line (\d+), column \d+|end of document)\)", str(exc), re.DOTALL)
        reason, line = found.groups() if found else (str(exc), None)
        where = f" line {line}" if line else ""
        raise SetupError(f"{path}{where}: not valid TOML ({reason}{'' if line else ' at the end'})") from None
    if not isinstance(document.get(CODEX_OTEL_TABLE, {}), dict):
        raise SetupError(f"{path}: \"{CODEX_OTEL_TABLE}\" is not a table (Codex CLI's [otel] is a table of "
                         "exporter settings)")
    return raw, text, document


def settings_bytes(settings: dict) -> bytes:
    return (json.dumps(settings, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


@dataclasses.dataclass(frozen=True)
class TomlStatement:
    """One statement of a TOML text: a [table] header, a key = value (on one line or more), or another line (a
    comment, a blank line); its lines (indexes), the table it is in, and the key path it names from the top."""
    first: int
    last: int
    kind: str  # "table", "key" or "other"
    table: tuple[str, ...]
    path: tuple[str, ...]


def toml_key_path(key: str) -> tuple[str, ...]:
    """The parts of a dotted key as written, as TOML reads them (quotes taken off, escapes resolved)."""
    value, path = tomllib.loads(f"{key} = 0"), []
    while isinstance(value, dict):
        name, value = next(iter(value.items()))
        path.append(name)
    return tuple(path)


def toml_value_end(text: str, start: int) -> int:
    """Where the value starting at `start` ends: the offset of the end of its last line. Strings, comments and
    brackets are stepped over, so that an array or a multi-line string takes as many lines as it has."""
    depth, index = 0, start
    while index < len(text):
        char = text[index]
        if text.startswith(('"""', "'''"), index):
            quote, index = text[index:index + 3], index + 3
            while index < len(text) and not text.startswith(quote, index):
                index += 2 if quote == '"""' and text[index] == "\\" else 1
            index += 3
            while text.startswith(quote[0], index):  # up to two quotes of the content touch the closing ones
                index += 1
            continue
        if char in "\"'":
            index += 1
            while index < len(text) and text[index] not in (char, "\n"):
                index += 2 if char == '"' and text[index] == "\\" else 1
        elif char == "#":
            index = text.find("\n", index)
            if index < 0:
                break
            continue
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "\n" and depth <= 0:
            return index
        index += 1
    return len(text)


def toml_statements(text: str) -> list[TomlStatement]:
    """The statements of a valid TOML text, in order, covering every line."""
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    statements, table, number = [], (), 0
    while number < len(lines):
        header, key = TOML_HEADER.match(lines[number]), TOML_KEY_VALUE.match(lines[number])
        if header:
            table = toml_key_path(header.group(2))
            statements.append(TomlStatement(number, number, "table", table, table))
            last = number
        elif key:
            end = toml_value_end(text, offsets[number] + key.end())
            last = number + text.count("\n", offsets[number], end)
            statements.append(TomlStatement(number, last, "key", table, table + toml_key_path(key.group(1))))
        else:
            last = number
            statements.append(TomlStatement(number, number, "other", table, ()))
        number = last + 1
    return statements


def toml_inline(value: Any) -> str:
    """A value as TOML writes it on one line: a table inline, a string in double quotes."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(key)} = {toml_inline(item)}" for key, item in value.items()) + " }" \
            if value else "{}"
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_inline, value)) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else str(value)


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def toml_with_entries(path: Path, text: str, table: str, entries: dict[str, Any], keep_table: bool) -> str:
    """The TOML text with the keys of [table] that entries names set to its values (None: taken out), wherever and
    however they were written (in [table], a dotted key, a [table.key] subtable): each on one line, after [table]'s
    own keys. Every other line stays as it was. Without keep_table, a [table] left with no key of its own goes."""
    lines = text.splitlines(keepends=True)
    statements = toml_statements(text)
    if any(statement.kind == "key" and statement.path == (table,) for statement in statements):
        raise SetupError(f"{path}: {table} is an inline table ({table} = {{...}}); write it as an [{table}] table for "
                         "ccmon setup to edit")
    taken = {number for statement in statements if len(statement.path) > 1 and statement.path[0] == table and
             statement.path[1] in entries for number in range(statement.first, statement.last + 1)}
    values = [f"{toml_key(key)} = {toml_inline(value)}\n" for key, value in entries.items() if value is not None]
    headers = [statement for statement in statements if statement.kind == "table" and statement.path == (table,)]
    on_top = [statement for statement in statements if statement.kind == "key" and not statement.table and
              statement.path[0] == table and statement.first not in taken]
    if headers:  # after the table's last key, else its header
        own = [statement for statement in statements if statement.kind == "key" and statement.table == (table,) and
               statement.first not in taken]
        at = (own[-1].last if own else headers[0].first) + 1
        if not own and not values and not keep_table:
            taken.add(headers[0].first)
    elif on_top:  # a table made of dotted keys (otel.environment = "dev") takes no [header] after them
        at, values = on_top[-1].last + 1, [f"{toml_key(table)}.{value}" for value in values]
    else:  # a new [table] at the end, after a blank line
        at = len(lines)
        if values:
            values = ["\n" if lines else "", f"[{toml_key(table)}]\n", *values]
    if values and at and not lines[at - 1].endswith("\n"):
        lines[at - 1] += "\n"
    kept = [line if number not in taken else "" for number, line in enumerate(lines)]
    return "".join(kept[:at] + values + kept[at:])


def toml_edited(path: Path, text: str, document: dict, table: str, entries: dict[str, Any], keep_table: bool) -> str:
    """toml_with_entries, checked: the result reads as the document with those entries and nothing else changed."""
    edited = toml_with_entries(path, text, table, entries, keep_table)
    wanted = {key: value for key, value in {**document.get(table, {}), **entries}.items() if value is not None}
    expected = {**document, table: wanted} if wanted or keep_table else \
        {key: value for key, value in document.items() if key != table}
    try:
        result = tomllib.loads(edited)
    except tomllib.TOMLDecodeError:
        result = None
    if result != expected:
        raise SetupError(f"{path}: ccmon setup cannot rewrite its [{table}] table as it is written and keep every "
                         f"other key (set {' and '.join(f'{table}.{key}' for key in entries)} by hand: see "
                         "ccmon's docs/setup.md)")
    return edited


def setup_changes(settings: dict, env: dict[str, str], command: str,
                  replace_status_line: bool) -> tuple[dict, list[str], list[str]]:
    """(the settings with ccmon's entries, one line per change, notes on what was kept that is not ccmon's).
    Every other key and value stays as it was, in its place."""
    updated = dict(settings)
    changes, notes = [], []
    updated_env = dict(settings.get("env", {}))
    for name, value in env.items():
        if updated_env.get(name) != value:
            was = f" (was: {updated_env[name]})" if name in updated_env else ""
            changes.append(f"set env.{name} = {value}{was}")
            updated_env[name] = value
    updated["env"] = updated_env
    current = settings.get("statusLine")
    status_line = {**(current if isinstance(current, dict) else {}), "type": "command", "command": command}
    if current is not None and not is_ccmon_status_line(current) and not replace_status_line:
        notes.append(f"kept statusLine: {json.dumps(current, ensure_ascii=False)} is not ccmon's; "
                     "--replace-status-line replaces it")
    elif current != status_line:  # its other keys (padding) stay
        was = f" (was: {json.dumps(current, ensure_ascii=False)})" if current is not None else ""
        changes.append(f"set statusLine: {command}{was}")
        updated["statusLine"] = status_line
    return updated, changes, notes


def telemetry_changes(settings: dict, telemetry: dict[str, Any]) -> tuple[dict, list[str]]:
    """(Gemini CLI's or Qwen Code's settings with ccmon's telemetry entries, one line per change). Every other key
    and value stays as it was, in its place; an outfile goes (it would take the telemetry off OTLP)."""
    block = dict(settings.get("telemetry", {}))
    changes = []
    for name, value in telemetry.items():
        if name not in block or json.dumps(block[name]) != json.dumps(value):  # true is not 1
            was = f" (was: {json.dumps(block[name], ensure_ascii=False)})" if name in block else ""
            changes.append(f"set telemetry.{name} = {json.dumps(value, ensure_ascii=False)}{was}")
            block[name] = value
    if "outfile" in block:
        changes.append(f"removed telemetry.outfile (was: {json.dumps(block.pop('outfile'), ensure_ascii=False)}): "
                       "with it the telemetry goes to that file, not to ccmon")
    return {**settings, "telemetry": block}, changes


def codex_config_changes(path: Path, text: str, document: dict, exporter: dict) -> tuple[str, list[str]]:
    """(Codex CLI's config.toml with ccmon's exporters in [otel], one line per change). Every other line stays
    as it was."""
    otel = document.get(CODEX_OTEL_TABLE, {})
    entries = {key: exporter for key in CODEX_EXPORTER_KEYS if otel.get(key) != exporter}
    changes = [f"set {CODEX_OTEL_TABLE}.{key} = {toml_inline(exporter)}" +
               (f" (was: {toml_inline(otel[key])})" if key in otel else "") for key in entries]
    return (toml_edited(path, text, document, CODEX_OTEL_TABLE, entries, True) if entries else text), changes


def planned_setup(agent: str, config: Config, args: argparse.Namespace, path: Path,
                  environ: dict[str, str]) -> tuple[bytes | None, bytes, list[str], list[str]]:
    """(the file's bytes, None when there is none; its bytes with ccmon's entries; one line per change; notes)."""
    if agent == CODEX:
        raw, text, document = read_codex_config(path)
        updated, changes = codex_config_changes(path, text, document, codex_exporter(config))
        return raw, updated.encode("utf-8"), changes, []
    raw, settings = read_json_settings(path, agent)
    if agent == CLAUDE_CODE:
        command = status_line_command(config, sys.executable, ccmon_program(),
                                      status_line_template(settings.get("statusLine")))
        updated, changes, notes = setup_changes(settings, telemetry_env(config), command, args.replace_status_line)
    else:
        updated, changes = telemetry_changes(settings, telemetry_settings(config))
        notes = token_note(agent, config) + overriding_variables(agent, environ)
    return raw, settings_bytes(updated), changes, notes


def without_token(line: str, token: str) -> str:
    """A line to print: the token stays in the file, off the terminal."""
    return line.replace(token, "<token>") if token else line


def run_setup(config: Config, args: argparse.Namespace, environ: dict[str, str], home: Path) -> int:
    """ccmon setup: an agent's user settings pointed at this ccmon's server (Claude Code's, by default, and its
    status line at ccmon)."""
    agent = args.agent
    path = agent_settings_path(agent, environ, home)
    path = path.resolve() if path.is_symlink() else path  # a dotfiles link stays a link; its target is written
    backup = path.with_name(path.name + SETUP_BACKUP_SUFFIX)
    try:
        if args.undo:
            return undo_setup(agent, path, backup, args.dry_run)
        raw, updated, changes, notes = planned_setup(agent, config, args, path, environ)
        if changes and not args.dry_run:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            mode = stat.S_IMODE(path.stat().st_mode) if raw is not None else NEW_SETTINGS_MODE
            if not backup.exists():  # the content before ccmon's first change; empty: there was no file
                write_atomically(backup, raw or b"", mode)
            write_atomically(path, updated, mode)
    except SetupError as exc:
        print(f"ccmon setup: {exc}; left as it is", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"ccmon setup: cannot write {exc.filename or path}: {exc.strerror}; {path} is as it was",
              file=sys.stderr)
        return 1
    for line in changes:  # said once done: a line says what the file now holds
        print(without_token(("would " if args.dry_run else "") + line, config.monitor_token))
    for line in notes:
        print(line)
    if not changes:
        print(f"nothing to change: {path} already points {SETUP_TOOLS[agent]} at ccmon ({otlp_endpoint(config)})")
    elif args.dry_run:
        print(f"nothing written (--dry-run): {path}")
    else:
        undo = "" if agent == CLAUDE_CODE else f" --agent {agent_names(agent)[1]}"  # the undo of this agent's file
        print(f"wrote {path} (before ccmon: {backup}; ccmon setup{undo} --undo restores it)")
    return 0


def reverted_json_settings(agent: str, path: Path, backup: Path | None) -> tuple[bytes | None, bytes | None,
                                                                                  bytes, bool]:
    """(the settings' bytes before ccmon setup, None: there was no file (backup None); their bytes now, None: none;
    the settings now with ccmon's entries as they were before; whether that is all they were before)."""
    original_raw, original = read_json_settings(backup, agent) if backup else (None, {})
    current_raw, current = read_json_settings(path, agent)
    entries = {"env": TELEMETRY_ENV_KEYS, "statusLine": None} if agent == CLAUDE_CODE else \
        {"telemetry": TELEMETRY_SETTINGS_KEYS}  # an object's keys ccmon writes, or None: the whole value
    reverted = {key: value for key, value in current.items() if key not in entries}
    for block, keys in entries.items():
        if keys is None:
            if block in original:
                reverted[block] = original[block]
            continue
        inner = {name: value for name, value in current.get(block, {}).items() if name not in keys}
        inner.update({name: value for name, value in original.get(block, {}).items() if name in keys})
        if inner or block in original:
            reverted[block] = inner
    return original_raw, current_raw, settings_bytes(reverted), current_raw is None or reverted == original


def reverted_codex_config(agent: str, path: Path, backup: Path | None) -> tuple[bytes | None, bytes | None,
                                                                                 bytes, bool]:
    """reverted_json_settings of Codex CLI's config.toml: its [otel] exporters as they were, every other line as
    it is."""
    original_raw, _, original = read_codex_config(backup) if backup else (None, "", {})
    current_raw, text, current = read_codex_config(path)
    before = original.get(CODEX_OTEL_TABLE, {})
    entries = {key: before.get(key) for key in CODEX_EXPORTER_KEYS}
    reverted = toml_edited(path, text, current, CODEX_OTEL_TABLE, entries, CODEX_OTEL_TABLE in original)
    whole = current_raw is None or tomllib.loads(reverted) == original
    return original_raw, current_raw, reverted.encode("utf-8"), whole


def undo_setup(agent: str, path: Path, backup: Path, dry_run: bool) -> int:
    """Put back what ccmon setup changed, from the backup. A file changed only by ccmon gets its original bytes
    back; one edited since keeps those edits, only ccmon's entries going back to what they were."""
    if not backup.exists():
        print(f"nothing to undo: no {backup}")
        return 0
    had_file = backup.stat().st_size > 0  # an empty backup: there was no settings file before ccmon setup
    revert = reverted_codex_config if agent == CODEX else reverted_json_settings
    original_raw, current_raw, reverted, whole = revert(agent, path, backup if had_file else None)
    if not dry_run:
        if whole and not had_file:
            path.unlink(missing_ok=True)
        else:
            mode = stat.S_IMODE((path if current_raw is not None else backup).stat().st_mode)
            write_atomically(path, original_raw if whole else reverted, mode)
        backup.unlink()
    verb = "would restore" if dry_run else "restored"
    if whole:
        print(f"{verb} {path} as it was before ccmon setup" + ("" if had_file else " (there was none)"))
    else:
        print(f"{verb} ccmon's entries in {path} as they were before ccmon setup; other changes since are kept")
    return 0

# ---------------------------------------------------------------- Doctor: ccmon doctor, the chain from Claude Code to the monitor checked link by link

TELEMETRY_LAG_MS = 5 * 60_000  # transcripts newer than the newest telemetry by more: telemetry is not arriving
TRANSCRIPT_TAIL_BYTES = 1 << 20  # of the newest transcript, read for its newest entry
OTLP_DEFAULT_PORTS = {"grpc": 4317, "http/protobuf": 4318, "http/json": 4318}
TELEMETRY_NOT_ARRIVING = ("telemetry is not arriving; history is being filled from transcripts. Likely: Claude Code "
                          "was started before ccmon setup (restart it), its environment or a project's "
                          ".claude/settings.json overrides the exporter, the server was down or unreachable from "
                          "Claude Code, or this Claude Code release does not export")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One link of the chain: ok, warn (works, but not as it should) or fail; the message says what holds, or what
    is wrong and what to do about it."""
    link: str
    status: str
    message: str


@dataclasses.dataclass(frozen=True)
class ClaudeEnv:
    """The telemetry settings Claude Code starts with: its settings file's env over the environment ccmon sees
    (Claude Code applies the file's env over its own), each value with where it is from."""
    values: dict[str, tuple[str, str]]  # name -> (value, where)

    def get(self, name: str) -> str:
        return self.values.get(name, ("", ""))[0]

    def where(self, name: str) -> str:
        return self.values.get(name, ("", "unset"))[1]


def claude_env(settings: dict, settings_path: Path, environ: dict[str, str]) -> ClaudeEnv:
    values = {name: (environ[name], "the environment") for name in TELEMETRY_ENV_KEYS if name in environ}
    values.update({name: (str(value), str(settings_path)) for name, value in settings.get("env", {}).items()
                   if name in TELEMETRY_ENV_KEYS})
    return ClaudeEnv(values)


def same_host(one: str, other: str) -> bool:
    """The same machine: the same name, or both loopback (localhost, 127.0.0.1, ::1)."""
    one, other = one.strip("[]").lower(), other.strip("[]").lower()
    return one == other or (is_loopback(f"{one}:0") and is_loopback(f"{other}:0"))


def endpoint_reaches(endpoint: str, protocol: str, address: str, tls: bool) -> str:
    """'' when an OTLP endpoint URL reaches the server listening at address (HOST:PORT), else why not."""
    try:
        url = urlsplit(endpoint)
        port = url.port or OTLP_DEFAULT_PORTS[protocol]
    except ValueError:
        return f"{endpoint!r} is not a URL"
    host, server_port = address.rsplit(":", 1)
    if url.scheme not in ("http", "https") or not url.hostname:
        return f"{endpoint!r} is not an http:// or https:// URL"
    anywhere = host.strip("[]") in ("0.0.0.0", "::")  # a wildcard listener: any name of this machine reaches it
    if not (anywhere or same_host(url.hostname, host)) or port != int(server_port):
        return f"it sends to {url.hostname}:{port}, not to this server's {address}"
    if (url.scheme == "https") != tls:
        return f"it uses {url.scheme}://, the server {'has' if tls else 'has no'} TLS"
    return ""


def bearer_of(headers: str) -> str:
    """The bearer token in OTEL_EXPORTER_OTLP_HEADERS (key=value pairs, comma-separated, values URL-encoded)."""
    for pair in headers.split(","):
        key, _, value = pair.partition("=")
        value = unquote(value.strip())
        if key.strip().lower() == "authorization" and value.lower().startswith("bearer "):
            return value[len("bearer "):].strip()
    return ""


def settings_findings(config: Config, env: ClaudeEnv, http_address: str | None) -> list[Finding]:
    """Telemetry on, the exporter reaching this server (its gRPC or OTLP/HTTP address, by the protocol: '' when
    it has none, None when not known here), the token."""
    where = env.where("CLAUDE_CODE_ENABLE_TELEMETRY")
    enabled = env.get("CLAUDE_CODE_ENABLE_TELEMETRY").strip().lower() in ("1", "true")
    logs = "otlp" in [word.strip() for word in env.get("OTEL_LOGS_EXPORTER").split(",")]
    if not enabled or not logs:
        off = "CLAUDE_CODE_ENABLE_TELEMETRY" if not enabled else "OTEL_LOGS_EXPORTER"
        value = f"{env.get(off)} ({env.where(off)})" if env.get(off) else "unset"
        return [Finding("telemetry", "fail", f"off: {off} is {value}; run ccmon setup, then restart Claude Code")]
    found = [Finding("telemetry", "ok", f"on ({where})")]
    protocol, endpoint = env.get("OTEL_EXPORTER_OTLP_PROTOCOL"), env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    address = config.monitor_server.removeprefix("https://") if protocol == "grpc" else http_address
    if protocol not in OTLP_DEFAULT_PORTS:
        found.append(Finding("exporter", "fail", f"OTEL_EXPORTER_OTLP_PROTOCOL is {protocol or 'unset'} "
                             f"({env.where('OTEL_EXPORTER_OTLP_PROTOCOL')}), not one of "
                             f"{', '.join(OTLP_DEFAULT_PORTS)}; run ccmon setup"))
    elif not endpoint:
        found.append(Finding("exporter", "fail", "OTEL_EXPORTER_OTLP_ENDPOINT is unset; run ccmon setup"))
    elif address is None:
        found.append(Finding("exporter", "warn", f"{protocol} to {endpoint}: this server's OTLP/HTTP address is "
                             "not known here (--server-http-address), so not checked"))
    elif not address:
        found.append(Finding("exporter", "fail", f"{protocol} to {endpoint}: this server does not take OTLP/HTTP "
                             "(server.http_address is off); run ccmon setup (it writes grpc)"))
    else:
        problem = endpoint_reaches(endpoint, protocol, address, protocol == "grpc" and bool(config.monitor_tls))
        where = env.where("OTEL_EXPORTER_OTLP_ENDPOINT")
        found.append(Finding("exporter", "fail", f"{protocol} to {endpoint} ({where}): {problem}; run ccmon setup")
                     if problem else
                     Finding("exporter", "ok", f"{protocol} to {endpoint}, this server"))
    sent = bearer_of(env.get("OTEL_EXPORTER_OTLP_HEADERS"))
    if not config.monitor_token:
        found.append(Finding("token", "ok", "none needed (the server has no token)"))
    elif not sent:
        found.append(Finding("token", "fail", "the server has a token; Claude Code sends none "
                             "(OTEL_EXPORTER_OTLP_HEADERS): run ccmon setup"))
    elif not hmac.compare_digest(sent, config.monitor_token):
        found.append(Finding("token", "fail", f"Claude Code sends another token than the server's "
                             f"({env.where('OTEL_EXPORTER_OTLP_HEADERS')}): run ccmon setup"))
    else:
        found.append(Finding("token", "ok", "Claude Code sends the server's token"))
    return found


def protocol_counts(receivers: Iterable[ReceiverCounts]) -> dict[str, ReceiverCounts]:
    """Per protocol, its signals together: the newest acceptance, the sums."""
    merged: dict[str, ReceiverCounts] = {}
    for counts in receivers:
        was = merged.get(counts.protocol, ReceiverCounts(counts.protocol, "", None, 0, 0))
        newest = max((ms for ms in (was.last_ms, counts.last_ms) if ms is not None), default=None)
        merged[counts.protocol] = ReceiverCounts(counts.protocol, "", newest, was.accepted + counts.accepted,
                                                 was.rejected + counts.rejected)
    return merged


def received_findings(receivers: list[ReceiverCounts], protocol: str, now: int) -> list[Finding]:
    """Per protocol, the last telemetry accepted and its age; none over Claude Code's protocol fails."""
    merged = protocol_counts(receivers)
    found = []
    for name in RECEIVER_PROTOCOLS:
        counts = merged.get(name)
        if counts is None or counts.last_ms is None:
            if name == protocol:
                rejected = f" ({plural(counts.rejected, 'record')} rejected: see the server's log)" if counts else ""
                found.append(Finding(f"received {name}", "fail", f"nothing yet{rejected}; once the settings above "
                                     "hold, restart Claude Code and use it"))
            continue
        rejected = f", {counts.rejected} rejected (see the server's log)" if counts.rejected else ""
        found.append(Finding(f"received {name}", "ok", f"last {reading_age(counts.last_ms, now)} "
                             f"({dt.datetime.fromtimestamp(counts.last_ms / 1000, dt.timezone.utc):%Y-%m-%d %H:%M:%S} "
                             f"UTC), {plural(counts.accepted, 'record')} accepted{rejected}"))
    return found


def status_line_finding(settings: dict, settings_path: Path, reading: LimitReading | None, now: int) -> Finding:
    current = settings.get("statusLine")
    if current is None:
        return Finding("status line", "fail", f"not set in {settings_path}: run ccmon setup")
    if not is_ccmon_status_line(current):
        return Finding("status line", "fail", f"{settings_path} runs another status line: ccmon setup "
                                              "--replace-status-line makes it ccmon's")
    if reading is None:
        return Finding("status line", "ok", "ccmon's; no reading yet (one comes each time Claude Code draws it)")
    limits = "with Claude's limits (a subscription)" if reading.five_hour or reading.seven_day else \
        "without Claude's limits (an API key, or a Claude Code too old to give them)"
    return Finding("status line", "ok", f"ccmon's; last reading {reading_age(reading.read_ms, now)}, {limits}")


def newest_transcript_entry(files: list[Path]) -> int | None:
    """The time of the newest API answer in the newest transcript (by its last write), from its tail."""
    try:
        newest = max(files, key=lambda path: path.stat().st_mtime_ns)
        with newest.open("rb") as handle:
            handle.seek(max(0, newest.stat().st_size - TRANSCRIPT_TAIL_BYTES))
            lines = handle.read().decode(errors="replace").splitlines()
    except (OSError, ValueError):
        return None
    times = [entry.ts_ms for entry in map(transcript_entry, lines) if isinstance(entry, TranscriptEntry)]
    return max(times, default=None)


def transcripts_finding(roots: list[Path], newest_telemetry: int | None, local: bool, now: int) -> Finding:
    files = TranscriptFiles(roots).paths()
    if not files:
        return Finding("transcripts", "ok", f"none under {' or '.join(map(str, roots))}")
    count = plural(len(files), "file")
    read = "read by this server" if local else "not read by this server (not the local one)"
    newest = newest_transcript_entry(files)
    if newest is None:
        return Finding("transcripts", "ok", f"{count}, {read}")
    telemetry = f"newest telemetry {reading_age(newest_telemetry, now)}" if newest_telemetry else "no telemetry"
    if newest - (newest_telemetry or 0) > TELEMETRY_LAG_MS:
        return Finding("transcripts", "warn", f"{count}, newest entry {reading_age(newest, now)}, {telemetry}: "
                                              f"{TELEMETRY_NOT_ARRIVING}")
    return Finding("transcripts", "ok", f"{count}, {read}; newest entry {reading_age(newest, now)}, {telemetry}")


def history_findings(environ: dict[str, str], home: Path, local: bool) -> list[Finding]:
    """A line for each other agent whose history is on this machine: how many files, and whether this server
    reads them (the local one follows them; any other needs ccmon import)."""
    found = []
    for root, agent in history_roots(environ, home).items():
        if agent != CLAUDE_CODE and (files := TranscriptFiles([root]).paths()):
            read = "read by this server" if local else "not read by this server (not the local one): ccmon import " \
                                                       "sends them"
            found.append(Finding(f"{agent} history", "ok", f"{plural(len(files), 'file')} under {root}, {read}"))
    return found


def server_findings(config: Config) -> tuple[list[Finding], ccmon_pb2.GetServerInfoResponse | None,
                                             LimitReading | None]:
    """The server reached (the local one started when none answers, as the monitor does): (its finding, its
    info and newest status line reading, None when unreachable)."""
    try:
        started = start_local_server_if_needed(config)
    except ServerError as exc:
        return [Finding("server", "fail", str(exc))], None, None
    client = Client.for_config(config, timeout_s=5.0)
    try:
        info = client.server_info()
        reading = client.latest_reading() if info.version else None
    except ServerUnreachable as exc:
        fix = "check --monitor-server (monitor.server) or start the server there" if config.monitor_server_given \
            else "start it: ccmon --server, or turn monitor.autostart on" if not config.monitor_autostart \
            else f"see its log, {server_log_path(config)}"
        return [Finding("server", "fail", f"cannot reach {config.monitor_server}: {exc}; {fix}")], None, None
    finally:
        client.close()
    if not info.version:
        return [Finding("server", "fail", f"{config.monitor_server}: {GO_CCMON_ONLY}; ccmon doctor needs this "
                                          "ccmon's server")], None, None
    where = started or ("local" if is_loopback(config.monitor_server.removeprefix("https://")) else "remote")
    database = info.database_path + (" (the default)" if info.default_database else "")
    up = format_duration(max(0, now_ms() - ms_of(info.started_at)))
    return [Finding("server", "ok", f"ccmon {printable(info.version)} at {config.monitor_server} ({where}), up {up}, "
                                    f"database {database}")], info, reading


def doctor_findings(args: argparse.Namespace, environ: dict[str, str],
                    home: Path) -> tuple[list[Finding], list[ReceiverCounts]]:
    """Every link, in the order data flows: the config, the server, Claude Code's settings, what the server
    received, the status line, the transcripts, the other agents' histories; and the server's receiver counts. A
    link that cannot be checked for want of an earlier one is left out."""
    try:
        config = load_config(args)
    except ConfigError as exc:
        return [Finding("config", "fail", str(exc))], []  # it names the file or flag, and what is wrong
    found = [Finding("config", "ok", "no config file: the defaults" if config.source == "defaults" else
                     f"{config.source} is valid")]
    config = client_config(config)
    found += (checked := server_findings(config))[0]
    _, info, reading = checked
    settings_path = claude_settings_path(environ, home)
    try:
        _, settings = read_json_settings(settings_path, CLAUDE_CODE)
    except SetupError as exc:
        return found + [Finding("claude settings", "fail", f"{exc}; fix it, then run ccmon setup")], []
    if info is None:
        return found, []
    http_address = None  # a named server's OTLP/HTTP address is not known here
    if not config.monitor_server_given:
        running = running_server(config)
        http_address = running.http_address if running else config.server_http_address or ""
    env = claude_env(settings, settings_path, environ)
    found += settings_findings(config, env, http_address)
    receivers = [receiver_counts_of(message) for message in info.receivers]
    now = now_ms()
    found += received_findings(receivers, env.get("OTEL_EXPORTER_OTLP_PROTOCOL"), now)
    found.append(status_line_finding(settings, settings_path, reading, now))
    newest = max((counts.last_ms for counts in receivers if counts.last_ms is not None), default=None)
    local = info.default_database and not config.monitor_server_given
    found.append(transcripts_finding(transcript_roots(environ, home), newest, local, now))
    return found + history_findings(environ, home, local), receivers


DOCTOR_MARKS = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


def run_doctor(args: argparse.Namespace, environ: dict[str, str], home: Path) -> int:
    """ccmon doctor: one line per link; exit 0 when every link holds, else 1."""
    found, receivers = doctor_findings(args, environ, home)
    healthy = all(finding.status == "ok" for finding in found)
    if args.json:
        print(json.dumps({"ok": healthy, "checks": [dataclasses.asdict(finding) for finding in found],
                          "received": [dataclasses.asdict(counts) for counts in receivers]}, indent=2))
    else:
        width = max(len(finding.link) for finding in found)
        for finding in found:
            print(f"{DOCTOR_MARKS[finding.status]} {finding.link:<{width}}  {printable(finding.message)}")
    return 0 if healthy else 1


# ---------------------------------------------------------------- View model and pure render functions

MIN_SIZE = (40, 12)
TABLE_ROWS_FIRST = 3  # data rows a tab's table keeps before the summary and panel above it take room
TABLE_CHROME = 3      # a table's title, header and total lines
HINT_ROOM = 10  # table rows a screen keeps before it spares one for a hint: hints never push data off
PAGE_FETCH = 300  # request rows fetched per refresh, around the scroll position: enough for a screen 225 rows tall


@dataclasses.dataclass(frozen=True)
class ViewState:
    """Everything the user chose; the screen is render(ViewState, ServerStatus, Snapshot, Screen)."""
    tab: str = "current"
    period: str = "a"
    oldest_first: bool = False
    scroll: int = 0                  # top row shown; on the Sessions tab, the selected row
    help: bool = False
    help_scroll: int = 0             # the help's top line, when it is longer than the screen
    notice: str = ""
    user: str | None = None          # the `u` filter
    session_id: str | None = None    # the session whose timeline is open (Enter on Sessions; Esc closes)
    selected: int = 0                # the Sessions selection while a timeline is open
    project: str | None = None       # the `p` filter
    agent: str | None = None         # the `g` filter
    chart_tokens: bool = False       # the Charts tab draws tokens, not cost (`c`)


@dataclasses.dataclass(frozen=True)
class ServerStatus:
    """Whether the monitor's poller reaches the server, and when it tries again."""
    connected: bool = False
    error: str = ""
    retry_at_ms: int = 0
    attempts: int = 0


@dataclasses.dataclass(frozen=True)
class Frame:
    """Lines of a screen or of a tab's part of it, how its scrollable table pages, and what keys can pick from it."""
    lines: list[Line]
    page_rows: int = 1
    total_rows: int = 0
    session_ids: tuple[str, ...] = ()   # sessions Enter can open, in scroll order
    user_names: tuple[str, ...] = ()
    project_names: tuple[str, ...] = ()
    agent_names: tuple[str, ...] = ()   # the agents with usage in the period, in AGENTS' order


def period_range(state: ViewState, settings: MonitorSettings, now: int,
                 auto_block_start: int | None = None) -> tuple[int | None, int]:
    """The selected period; the current automatic block is known from the last snapshot (`auto_block_start`)."""
    if state.period == "b" and settings.block_mode is not None:
        if isinstance(settings.block_mode, int):
            return current_block(now, settings.zone, settings.block_mode)[0], now
        return (auto_block_start if auto_block_start is not None else now), now  # the snapshot sets it exactly
    span = PERIODS[state.period][1]
    return (now - span if span else None), now


def query_for(state: ViewState, settings: MonitorSettings, now: int, auto_block_start: int | None = None) -> Query:
    start, end = period_range(state, settings, now, auto_block_start)
    offset = max(0, state.scroll - PAGE_FETCH // 4)
    return Query(state.tab, start, end, offset, PAGE_FETCH, state.oldest_first, settings.zone.key,
                 settings.limit_query(now), state.period == "b" and settings.block_mode is not None, state.user,
                 state.session_id, TABS[state.tab].fetch, state.project, TABS[state.tab].burnup, state.agent)


def handle_key(state: ViewState, key: str, settings: MonitorSettings, frame: Frame) -> tuple[ViewState, str]:
    """Apply one key press to what the user sees (`frame`). Returns the new state and an action:
    'quit', 'refresh' or ''."""
    if key in ("q", "Q", "^C"):
        return state, "quit"
    if state.help:
        top = scrolled(state.help_scroll, key, frame)
        if top is None:
            return dataclasses.replace(state, help=False), ""
        return dataclasses.replace(state, help_scroll=top), ""
    if key == "?":
        return dataclasses.replace(state, help=True, help_scroll=0), ""
    if key == "ESC":
        if not state.session_id:
            return state, ""
        return dataclasses.replace(state, session_id=None, scroll=state.selected), "refresh"
    names = list(TABS)
    digits = [str(number) for number in range(1, min(len(names), 9) + 1)]  # a key each: tabs past 9 by Tab
    if key in digits or key in ("\t", "KEY_BTAB"):
        step = 1 if key == "\t" else -1
        index = digits.index(key) if key in digits else (names.index(state.tab) + step) % len(names)
        return dataclasses.replace(state, tab=names[index], scroll=0, notice="", session_id=None), "refresh"
    if key in ("\n", "\r", "KEY_ENTER") and frame.session_ids:
        selected = min(state.scroll, len(frame.session_ids) - 1)
        return dataclasses.replace(state, session_id=frame.session_ids[selected], selected=selected, scroll=0), \
            "refresh"
    if key == "u":
        names = [name for name in frame.user_names if name]
        if not names:
            return dataclasses.replace(state, notice="no user names in this period to filter by"), ""
        following = names[names.index(state.user) + 1:] if state.user in names else names
        return dataclasses.replace(state, user=following[0] if following else None, scroll=0, notice=""), "refresh"
    if key == "p":
        names = [name for name in frame.project_names if name]
        if not names:
            return dataclasses.replace(state, notice="no projects in this period to filter by"), ""
        following = names[names.index(state.project) + 1:] if state.project in names else names
        return dataclasses.replace(state, project=following[0] if following else None, scroll=0, notice=""), \
            "refresh"
    if key == "g":
        if len(frame.agent_names) < 2 and state.agent is None:
            return dataclasses.replace(state, notice="one agent's usage in this period: nothing to filter by"), ""
        following = frame.agent_names[frame.agent_names.index(state.agent) + 1:] \
            if state.agent in frame.agent_names else frame.agent_names
        return dataclasses.replace(state, agent=following[0] if following else None, scroll=0, notice=""), \
            "refresh"
    if key == "b" and settings.block_mode is None:
        return dataclasses.replace(state, notice="block tracking is off: start ccmon with -b auto"), ""
    if key in PERIODS:
        return dataclasses.replace(state, period=key, scroll=0, notice=""), "refresh"
    if key == "o":
        return dataclasses.replace(state, oldest_first=not state.oldest_first, scroll=0), "refresh"
    if key == "c":  # the Charts tab's figures hold both: nothing to fetch
        if state.tab != "charts":
            return dataclasses.replace(state, notice="c switches the Charts tab between cost and tokens"), ""
        return dataclasses.replace(state, chart_tokens=not state.chart_tokens, notice=""), ""
    if key == "r":
        return state, "refresh"
    scroll = scrolled(state.scroll, key, frame)
    if scroll is not None:
        return dataclasses.replace(state, scroll=scroll), "refresh" if scroll != state.scroll else ""
    return state, ""


def scrolled(position: int, key: str, frame: Frame) -> int | None:
    """Where a scrolling key moves the top row of what `frame` shows (None for other keys). On the Sessions
    list the position is the selected row, which may be the last; a page stops with its last row at the bottom."""
    step = {"KEY_UP": -1, "k": -1, "KEY_DOWN": 1, "j": 1, "KEY_PPAGE": -frame.page_rows, "KEY_NPAGE": frame.page_rows,
            "KEY_HOME": -10 ** 12, "KEY_END": 10 ** 12}.get(key)
    if step is None:
        return None
    last = max(0, frame.total_rows - (1 if frame.session_ids else frame.page_rows))
    return min(max(0, position + step), last)


# -- lines and tables: a Line is a list of (text, style) segments no wider than the screen
Segment = tuple[str, str]
Line = list[Segment]


@dataclasses.dataclass(frozen=True)
class Glyphs:
    full: str
    empty: str
    rule: str
    dot: str
    box: str    # corners top left, top right, bottom left, bottom right, then the side
    unicode: bool = False  # charts in block elements (utf8_locale), else ASCII

    @classmethod
    def for_terminal(cls, unicode: bool) -> Glyphs:
        return cls("█", "░", "─", "●", "┌┐└┘│", True) if unicode else cls("#", ".", "-", "*", "++++|")


@dataclasses.dataclass(frozen=True)
class Screen:
    """What every render function draws for."""
    settings: MonitorSettings
    width: int
    rows: int                   # lines it may fill
    now: int
    glyphs: Glyphs


def clip(line: Line, width: int) -> Line:
    out, used = [], 0
    for text, style in line:
        if used >= width:
            break
        out.append((text[:width - used], style))
        used += len(out[-1][0])
    return out


def pad_between(left: str, right: str, width: int) -> str:
    gap = width - len(left) - len(right)
    return left + " " * gap + right if gap >= 1 else left[:width]


def rule(title: str, width: int, glyphs: Glyphs) -> Line:
    head = f"{glyphs.rule * 2} {title} "
    return [(head + glyphs.rule * max(0, width - len(head)), "rule")]


def table_lines(columns: list[Column], rows: list[tuple[list[Cell], str]], width: int) -> tuple[Line, list[Line]]:
    """A header line and one line per (cells, style) row, dropping columns that do not fit."""
    fitted = fit_columns(columns, [cells for cells, _ in rows], width)
    header = [(row_text(fitted, [c.title for c in columns]), "header")]
    return header, [[(row_text(fitted, cells), style)] for cells, style in rows]


def model_names(model: str) -> tuple[str, str, str]:
    """A model's name from longest to shortest: claude-sonnet-4-5-20250929, claude-sonnet-4-5, sonnet-4-5."""
    return model, short_model(model), short_model(model).removeprefix("claude-")


def session_names(session_id: str) -> tuple[str, str]:
    """A session id whole, or shortened (see short_session)."""
    return session_id, short_session(session_id)


def user_names(user: str, unknown: str = "-") -> Cell:
    """A user as named, and a hashed user id also cut short for a narrow column."""
    return (user, short_user(user)) if short_user(user) != user else user or unknown


def bar(fraction: float, width: int, glyphs: Glyphs) -> str:
    filled = min(width, max(0, int(round(min(fraction, 1.0) * width))))
    return glyphs.full * filled + glyphs.empty * (width - filled)


def gauge_width(width: int) -> int:
    """The block and week bars, one width so they line up: room is left beside them for their figures."""
    return max(5, min(30, width - 64))


def level_style(fraction: float) -> str:
    return "good" if fraction < 0.5 else "warn" if fraction < 0.8 else "bad"


# -- sections
def header_lines(state: ViewState, status: ServerStatus, snap: Snapshot | None, screen: Screen) -> list[Line]:
    settings, width = screen.settings, screen.width
    title = pad_between(" ccmon - Claude Code usage monitor", f"v{VERSION} ", width)
    wide = width >= 60
    if status.connected:
        link: Segment = (f" {screen.glyphs.dot} connected" + (f" {settings.server}" if wide else ""), "good")
    elif status.attempts == 0:
        link = (f" {screen.glyphs.dot} connecting to {settings.server}", "warn")
    else:
        wait = max(0, -(-(status.retry_at_ms - screen.now) // 1000))
        reason = f" ({printable(status.error)})" if wide else ""
        link = (f" {screen.glyphs.dot} disconnected{reason} - retrying in {wait}s", "bad")
    filter_text = TABS[state.tab].fixed_period or PERIODS[state.period][0]
    order = "oldest first" if state.oldest_first else "newest first"
    updated = f"updated {local_time(snap.taken_ms, settings.zone, '%H:%M:%S')}" if snap else "no data yet"
    user = [f"user {state.user}"] if state.user else []
    user += [f"agent {state.agent}"] if state.agent else []
    known = [p.project for p in snap.projects] if snap else []  # a label tells it from these
    project = [f"project {project_labels([state.project, *known])[state.project]}"] if state.project else []
    *error_lines, last = message_lines(link[0], width) or [""]  # the whole error, on as many lines as it takes
    history = [f"reading history: {files_read(snap.history)}"] if snap and snap.history else []  # partial till done
    details = joined_to_fit(["", *(f" | {part}" for part in (*history, *user, *project, filter_text, order,
                                                              updated))], width - len(last))  # most important first
    return [[(title, "title")], tab_strip(state.tab, width), *([(text, link[1])] for text in error_lines),
            [(last, link[1]), (details, "dim")]]


def message_lines(text: str, width: int) -> list[str]:
    """A message on lines of at most `width`, continued with an indent: errors are read whole, never cut."""
    return textwrap.wrap(text, width, subsequent_indent="   ", break_on_hyphens=False)


def tab_strip(active: str, width: int) -> Line:
    """Every tab named: by its title where all fit, else by its digit and short title, else packed tighter, and
    at the tightest with nothing between them but their digits."""
    tabs = list(TABS.values())
    packed = [f"{number}{tab.short_title}" for number, tab in enumerate(tabs, start=1)]
    layouts = (([f" {tab.title} " for tab in tabs], " "),
               ([f" {number} {tab.short_title} " for number, tab in enumerate(tabs, start=1)], " "),
               (packed, " "), (packed, ""))
    labels, gap = next(((labels, gap) for labels, gap in layouts
                        if sum(len(label) + len(gap) for label in labels) + 1 <= width), layouts[-1])
    strip: Line = [(" ", "")]
    for tab, label in zip(tabs, labels):
        strip += [(label, "tab_active" if tab.name == active else "tab"), (gap, "")]
    return strip


def usage_lines(snap: Snapshot, state: ViewState, screen: Screen, compact: bool = False) -> list[Line]:
    """The period's usage as a table (base, premium, total), or `compact`, in one line. Its rate is the period's
    average, named so: the panel's pace is the recent one."""
    start, end = snap.query.start_ms, snap.query.end_ms
    period = snap.data.period
    if compact:
        return [[(joined_to_fit([f"{PERIODS[state.period][0].capitalize()}: {format_cost(period.total.cost_nanos)}",
                                 f", {format_count(period.total.requests)} requests",
                                 f", {format_count(period.total.total)} tokens",
                                 f" (premium {format_cost(period.premium.cost_nanos)})"], screen.width), "bold")]]
    columns = [Column("", 8, 0, left=True), Column("Requests", 8, 1), Column("Limited", 8, 2),
               Column("Cache", 8, 4), Column("Total", 8, 3), Column("Cost", 10, 1), Column("Avg rate", 10, 5)]
    rows = []
    # The other agents' (see Split), a row each where the tab has them by agent
    by_agent = tuple((LIMITS_OF.get(agent, agent), usage, "") for agent, usage in snap.data.others)
    others = by_agent or ((("Others", period.other, ""),) if period.other != Usage() else ())
    for name, usage, style in (("Base", period.base, ""), ("Premium", period.premium, ""), *others,
                               ("Total", period.total, "bold")):
        rate = "-" if start is None or name != "Premium" else format_rate(per_minute(usage.limited, end - start))
        rows.append(([name, format_count(usage.requests), format_count(usage.limited), format_count(usage.cache),
                      format_count(usage.total), format_cost(usage.cost_nanos), rate], style))
    header, body = table_lines(columns, rows, screen.width)
    lines = [rule(f"Usage - {PERIODS[state.period][0]}", screen.width, screen.glyphs), header, *body]
    burnup = snap.block_series is not None  # the Current tab draws Claude's window above its requests
    if screen.settings.block_mode is None and not burnup and screen.rows - len(lines) - 2 > HINT_ROOM:  # 2: titles
        lines.append([(joined_to_fit(["Block tracking is off: run with -b auto",
                                      " (or -b 5am for fixed 5-hour windows)."], screen.width), "dim")])
    return lines


GAUGE_LABEL = 12                # "Claude week ": every gauge's bar starts in one column
MIN_CALIBRATION_READINGS = 3    # a capacity from fewer readings is not projected to: one reading divides by a
                                # share Claude rounds (at 5 % that is 10 % either way), a median of three sets an
                                # odd one aside


def claude_window_status(limits: LimitFigures, now: int) -> BlockStatus | None:
    """Claude's own live 5-hour window as a BlockStatus in tokens, to say where the recent pace leads: used is
    Claude's % of the window's capacity calibrated from enough readings (Claude's figure counts what ccmon never
    saw: other machines, claude.ai), the pace ccmon's recent one. None without a live reading or such a capacity.
    The pace line and the burn-up both project from it: one answer per screen."""
    five = limits.claude.window("five_hour", now)
    capacity = limits.claude.five_hour_capacity \
        if limits.claude.five_hour_readings >= MIN_CALIBRATION_READINGS else None
    if five is None or not capacity:
        return None
    return BlockStatus(five.resets_ms - BLOCK_MS, five.resets_ms, min(max(now, five.resets_ms - BLOCK_MS),
                       five.resets_ms), round(five.percent * capacity / 100), capacity, limits.recent_rate)


def limit_gauge_lines(snap: Snapshot, screen: Screen, most: int = 4) -> list[Line]:
    """The block and week panel, one line a figure: the block, the recent pace and where it leads, the week, and
    other agents' own plans' limits (Codex's) while a reading of them is live. While a reading of Claude's own
    window is live its gauge is Claude's share, with ccmon's count beside it as support; else ccmon's count against
    the limit, which says where it comes from. With room for fewer lines (`most`), the other agents' go first,
    then the pace, then the week."""
    limits = snap.limits
    if limits is None or snap.query.limits is None or most <= 0:
        return []
    settings, now = screen.settings, screen.now
    alert_at = min(settings.alerts) if settings.alerts else 101
    status = block_status(limits, now)
    five = limits.claude.window("five_hour", now)
    block = pace = week = None
    if five is not None:
        block = claude_gauge("5h", five, limits.claude.read_ms("five_hour"), status.used if status else None,
                             screen, alert_at)
    elif status is not None:
        block = block_gauge(limits, status, screen, alert_at)
    elif settings.block_mode is not None:
        block = [(joined_to_fit(["Block".ljust(GAUGE_LABEL) + "none active",
                                 ": the next 5-hour block starts with your next request"], screen.width), "dim")]
    if status is not None:
        pace = projection_line(limits, status, settings, screen.width)
    if settings.block_mode is not None or settings.weekly_limit or limits.claude.window("seven_day", now):
        week = weekly_line(limits, screen, alert_at)
    agents = [line for line in (agent_limits_line(reading, screen) for reading in limits.claude.agents) if line]
    kept = [line for line in (block, week, pace, *agents) if line is not None][:most]
    return [line for line in (block, pace, week, *agents) if any(line is one for one in kept)]


def agent_limits_line(reading: LimitReading, screen: Screen) -> Line | None:
    """Another agent's own plan's limits as last read (Codex's: 'Codex 5h    ##....  12.5%, resets 14:17; week 34%,
    resets Fri 10:00 (read 3 min ago)'), while a window of it has not reset; Claude's alerts never count it."""
    five, week = live_window(reading.five_hour, screen.now), live_window(reading.seven_day, screen.now)
    shown = five or week
    if shown is None:
        return None
    zone, age = screen.settings.zone, reading_age(reading.read_ms, screen.now)
    parts: list[str | tuple[str, ...]] = [f" {format_percent(shown.percent):>4}",
                                          f", resets {reset_time(shown.resets_ms, screen.now, zone)}"]
    if five and week:
        parts.append(f"; week {format_percent(week.percent)}, resets {reset_time(week.resets_ms, screen.now, zone)}")
    parts.append((f" (read {age})", f" ({age})"))
    return gauge_line(f"{LIMITS_OF[reading.agent]} {'5h' if five else 'week'}", shown.percent / 100,
                      level_style(shown.percent / 100), parts, screen)


def gauge_line(label: str, fraction: float, style: str, parts: list[str | tuple[str, ...]], screen: Screen) -> Line:
    """'Label' padded, a bar of `fraction`, then `parts` as joined_to_fit shows them (the first always)."""
    bar_width = gauge_width(screen.width)
    head = label.ljust(GAUGE_LABEL)
    return [(head, ""), (bar(fraction, bar_width, screen.glyphs), style),
            (joined_to_fit(parts, screen.width - len(head) - bar_width), "")]


def claude_gauge(label: str, window: LimitWindow, read_ms: int, counted: int | None, screen: Screen,
                 alert_at: int, pace: str = "") -> Line:
    """Claude's own share of a window as its gauge, when it resets, what ccmon counted in it, where the pace leads
    and how old Claude's figure is: 'Claude 5h   ####....  63%, resets 14:17; ccmon counted 21.0K (read 2 min
    ago)'."""
    style = "alert" if window.percent >= alert_at else level_style(window.percent / 100)
    age = reading_age(read_ms, screen.now)
    support = (f"; ccmon counted {format_count(counted)}", f"; ccmon {format_count(counted)}") \
        if counted is not None else ""
    resets = f", resets {reset_time(window.resets_ms, screen.now, screen.settings.zone)}"
    return gauge_line(f"Claude {label}", window.percent / 100, style,
                      [f" {format_percent(window.percent):>4}", resets, support, pace, (f" (read {age})", f" ({age})")],
                      screen)


def block_gauge(limits: LimitFigures, status: BlockStatus, screen: Screen, alert_at: int) -> Line:
    """ccmon's count against the block limit, where the limit comes from and the time left."""
    settings = screen.settings
    left, ends = f", {format_duration(status.remaining_ms)} left", f" (ends {local_time(status.end_ms, settings.zone)})"
    if not status.limit:
        return [(joined_to_fit(["Block".ljust(GAUGE_LABEL) + f"{format_count(status.used)} premium", left,
                                (" (no limit: set claude.plan or claude.max_tokens)", " (no limit set)")],
                               screen.width), "dim")]
    fraction = status.used / status.limit
    style = "alert" if fraction * 100 >= alert_at else level_style(fraction)
    figures = f" {format_percent(fraction * 100):>4}  {format_count(status.used)} / {format_count(status.limit)}"
    room = screen.width - GAUGE_LABEL - gauge_width(screen.width)
    noted = joined_to_fit([figures, limit_note(limits, settings)], room - len(left))  # as leaves the time left room
    return gauge_line("Block", fraction, style, [noted, left, ends], screen)


def limit_note(limits: LimitFigures, settings: MonitorSettings) -> tuple[str, ...]:
    """Where the block limit comes from, unless the user set it (calibrated, learned, or the plan's guess), in
    long and short words."""
    if limits.calibrated_from:
        return f" (calibrated from {plural(limits.calibrated_from, 'reading')})", " (calibrated)"
    if limits.learned_from:
        return f" (learned from {plural(limits.learned_from, 'block')})", " (learned)"
    if limit_is_guess(limits, settings):
        return (" (a guess from the plan: nothing learned yet)" if settings.learn else " (a guess from the plan)",
                " (plan's guess)", " (guess)")
    return ("",)


def limit_is_guess(limits: LimitFigures, settings: MonitorSettings) -> bool:
    return settings.limit_from_plan and not limits.calibrated_from and not limits.learned_from


def weekly_reached_ms(used: int, limit: int, rate: float, now: int) -> int | None:
    """When a rolling weekly limit is reached at `rate` tokens per minute (now if it already is)."""
    if used >= limit:
        return now
    return now + int((limit - used) / rate * 60_000) if rate > 0 else None


def weekly_line(limits: LimitFigures, screen: Screen, alert_at: int) -> Line:
    """The week's premium tokens (Claude's week while a reading of it is live, else the rolling 7 days): while
    Claude's reading is live, its share is the gauge and ccmon's count supports it; else against
    claude.weekly_max_tokens when set. Where the pace leads only by a limit set or calibrated from enough
    readings."""
    settings = screen.settings
    premium = weekly_premium(limits)
    families = ", ".join(f"{family} {format_count(u.limited)}" for family, u in limits.weekly.items()
                         if family != "haiku")
    detail = f" ({families})" if families else ""
    weekly = weekly_limit_in_force(limits, settings.weekly_limit)
    limit, calibrated_from = weekly.tokens, weekly.calibrated_from
    if calibrated_from is not None and calibrated_from < MIN_CALIBRATION_READINGS:
        limit = None
    reached = weekly_reached_ms(premium.limited, limit, limits.recent_rate, screen.now) if limit else None
    if reached is not None and limits.weekly_window and reached >= limits.weekly_window[1]:
        reached = None  # Claude's week resets first
    seven = limits.claude.window("seven_day", screen.now)
    if seven is not None:
        pace = "" if reached is None else f", limit {local_time(reached, settings.zone, '%a %H:%M')} at this pace"
        return claude_gauge("week", seven, limits.claude.read_ms("seven_day"), premium.limited, screen, alert_at,
                            pace)
    if limit:
        fraction = premium.limited / limit
        style = "alert" if fraction * 100 >= alert_at else level_style(fraction)
        pace = "" if reached is None else f", limit {local_time(reached, settings.zone, '%a %H:%M')} at this pace"
        figures = f" {format_percent(fraction * 100):>4}  {format_count(premium.limited)} / {format_count(limit)}"
        return gauge_line("Week", fraction, style, [figures, pace, detail], screen)
    return [(joined_to_fit(["Week".ljust(GAUGE_LABEL) + f"{format_count(premium.limited)} premium tokens, "
                            f"{format_cost(premium.cost_nanos)}", detail], screen.width), "dim")]


@dataclasses.dataclass(frozen=True)
class ProjectionWords:
    """How projection_line says where the pace leads, naming what it leads to: Claude's limit, the block limit
    or the plan's guess."""
    reached: str       # the limit is used up
    at_long: str       # reached before the end, at {at}
    at_short: str
    end_long: str      # not reached: {projected} at the end
    end_short: str


BLOCK_WORDS = ProjectionWords("; limit reached", "; at this pace the limit is reached at {at}", "; limit at {at}",
                              "; within limit at this pace ({projected} at block end)", "; {projected} at end")
GUESS_WORDS = ProjectionWords("; the plan's guess is reached", "; at this pace the plan's guess is reached at {at}",
                              "; plan guess at {at}", "; within the plan's guess at this pace ({projected} at block "
                              "end)", "; {projected} of guess at end")
CLAUDE_WORDS = ProjectionWords("; Claude's 5h limit reached (calibrated)",
                               "; Claude's 5h limit at this pace at {at}", "; Claude's limit at {at}",
                               "; at this pace {projected} of Claude's 5h limit at reset",
                               "; {projected} at reset")


def projection_line(limits: LimitFigures, status: BlockStatus, settings: MonitorSettings, width: int) -> Line:
    """The recent pace (the last 15 to 30 minutes: other paces on the screen are averages, named so) and where it
    leads, in long or short words to fit: in Claude's own window, to Claude's 5-hour limit by its capacity
    calibrated from enough readings, else nowhere (a guess does not stand beside Claude's figure); else to the
    block limit or the plan's guess, named for what it is."""
    pace = f"Recent pace {format_rate(status.burn_rate)}"
    if limits.claude.window("five_hour", status.now_ms) is not None:  # the gauge is Claude's
        target, words = claude_window_status(limits, status.now_ms), CLAUDE_WORDS
        if target is None:
            return [(joined_to_fit([pace, "; too few of Claude's readings to project its limit"], width), "")]
    else:
        target, words = status, GUESS_WORDS if limit_is_guess(limits, settings) else BLOCK_WORDS
    if not target.limit:
        return [(pace, "")]
    if target.used >= target.limit:
        return [(pace + words.reached, "bad")]
    reached = target.limit_reached_ms()
    if reached is not None:
        at = local_time(reached, settings.zone)
        long, short, style = words.at_long.format(at=at), words.at_short.format(at=at), "warn"
    else:
        projected = format_percent(target.projected_at_end() / target.limit * 100)
        long, short, style = (words.end_long.format(projected=projected),
                              words.end_short.format(projected=projected), "good")
    return [(pace + (long if len(pace + long) <= width else short), style)]


# -- tabs: each renders its snapshot's data into the rows left below the block figures
BURNUP_LINES = 10  # the burn-up's height where it has room: 7 rows of columns, the axis, its times, the legend
BURNUP_MIN_LINES = 5  # and its least on the Current tab: 2 rows of columns (16 eighths), the axis, times, legend
CURRENT_REQUESTS_KEPT = 4  # the requests the Current tab keeps under a burn-up of the least height (80x24)


def burnup_lines(snap: Snapshot, screen: Screen, height: int) -> list[str]:
    """The current 5-hour window as a burn-up, `height` lines at most ([] without a window or room). While a
    reading of Claude's own window is live, in Claude's figure (one answer per screen): its readings in this
    window, 100% the limit, and where the recent pace leads only by a capacity calibrated from enough readings.
    Else ccmon's premium tokens by the hour against the block limit (named the plan's guess when it is one),
    projected at the recent pace."""
    limits, series, now = snap.limits, snap.block_series, screen.now
    window = burnup_window(limits, now) if limits is not None else None
    if window is None or series is None:
        return []
    settings, unicode = screen.settings, screen.glyphs.unicode
    five = limits.claude.window("five_hour", now)
    if five is not None:  # its window, with block tracking or without
        points = [(r.read_ms, r.five_hour.percent) for r in series.readings
                  if r.five_hour is not None and r.five_hour.resets_ms == five.resets_ms]
        target = claude_window_status(limits, now)
        projected = target.projected_at_end() / target.limit * 100 if target else None
        return burnup_chart(*window, points, 100, projected, now, screen.width, height, unicode, settings.zone,
                            format_percent, "Claude's limit")
    status = block_status(limits, now)  # the block: the window is ccmon's
    points = running_premium(series.points, status.start_ms, now) + [(now, status.used)]  # the gauge's figure
    name = "plan's guess" if limit_is_guess(limits, settings) else "limit"
    return burnup_chart(status.start_ms, status.end_ms, points, status.limit, status.projected_at_end(), now,
                        screen.width, height, unicode, settings.zone, format_count, name)


def running_premium(points: Iterable[SeriesPoint], start_ms: int, now: int) -> list[tuple[int, int]]:
    """The premium tokens of the hours from start_ms on as a running total, each reached at its hour's end (now
    for the current one): a burn-up's columns."""
    totals, used = [], 0
    for point in sorted(points, key=lambda p: p.start_ms):
        if point.start_ms >= start_ms:
            used += point.split.premium.limited
            totals.append((min(point.start_ms + HOUR_MS, now), used))
    return totals


def rolling_week_lines(snap: Snapshot, screen: Screen, height: int) -> list[str]:
    """The last 7 days against claude.weekly_max_tokens while no reading of Claude's week is stored: the premium
    tokens so far as a burn-up (from the week's first whole hour, the Week gauge's figure now), the limit as a
    line; no projection (the week rolls on)."""
    now = screen.now
    start = now - 7 * DAY_MS
    points = running_premium(snap.data.points, start, now) + [(now, weekly_premium(snap.limits).limited)]
    return burnup_chart(start, now, points, screen.settings.weekly_limit, None, now, screen.width, height,
                        screen.glyphs.unicode, screen.settings.zone, format_count, "weekly limit")


def current_lines(snap: Snapshot, state: ViewState, screen: Screen) -> Frame:
    """The period's requests, with the 5-hour window's burn-up above them: BURNUP_MIN_LINES high where the
    requests keep CURRENT_REQUESTS_KEPT rows under it (from 80x24), taller only where they keep HINT_ROOM rows
    (the data rows come before more of their picture); none on smaller screens (the Charts tab draws it there)."""
    room = screen.rows - 2 - 1  # the requests' title and header; the burn-up's title
    height = min(BURNUP_LINES, max(BURNUP_MIN_LINES, room - HINT_ROOM))
    chart = burnup_lines(snap, screen, height) if room - height >= CURRENT_REQUESTS_KEPT else []
    if not chart:
        return requests_lines(snap, state, screen)
    frame = requests_lines(snap, state, dataclasses.replace(screen, rows=screen.rows - len(chart) - 1))
    title = rule(f"5-hour window - {burnup_subject(snap, screen.now)}", screen.width, screen.glyphs)
    return dataclasses.replace(frame, lines=[title, *([(line, "")] for line in chart), *frame.lines])


def burnup_subject(snap: Snapshot, now: int) -> str:
    return "Claude's own %" if snap.limits.claude.window("five_hour", now) else "premium tokens"


TIME_CHART_LINES = 10  # the most its time charts take: 7 rows of columns, the caption, the axis, its times
WEEK_CHART_LINES = 18  # and Claude's week: its readings, the axis, its times, the legend and 7 or 8 days


def charts_lines(snap: Snapshot, state: ViewState, screen: Screen) -> Frame:
    """The charts, each under its title, from the one the scroll keys chose (`state.scroll`) as many as fit
    whole: the first shrinks to the rows there are, the others show when they fit. Cost or tokens per `c`."""
    charts = chart_list(snap, state, screen)
    first = min(state.scroll, len(charts) - 1)
    lines, left = [], screen.rows
    for index, (title, drawn) in enumerate(charts[first:], start=first):
        chart = drawn(left - 1)
        if not chart or len(chart) + 1 > left:
            break
        place = (f"({index + 1} of {len(charts)}; j/k: more) ", f"{index + 1}/{len(charts)} ")
        heading = joined_to_fit([f"{title} ", place], screen.width - 3)
        lines += [rule(heading.rstrip(), screen.width, screen.glyphs), *([(line, "")] for line in chart)]
        left -= len(chart) + 1
    if not lines:
        lines = [[(text, "dim")] for text in message_lines(f"{charts[first][0]}: needs a taller terminal.",
                                                           screen.width)]
    return Frame(lines, 1, len(charts))


def chart_list(snap: Snapshot, state: ViewState, screen: Screen) -> list[tuple[str, Callable[[int], list[str]]]]:
    """(title, draw at a height) of each chart the Charts tab has: the 5-hour window (when there is one), the
    last 24 hours and 7 days by the hour, the week against Claude's weekly limit (when Claude's weekly readings
    are stored; else the last 7 days against claude.weekly_max_tokens, when set), the day × hour heatmap."""
    series: UsageSeries = snap.data
    zone, width, unicode, now = screen.settings.zone, screen.width, screen.glyphs.unicode, screen.now
    kind, format_value = ("tokens", format_count) if state.chart_tokens else \
        ("cost", lambda nanos: format_cost(int(nanos)))
    points = [(p.start_ms, p.split.total.total if state.chart_tokens else p.split.total.cost_nanos)
              for p in series.points]
    end = local_hours(now + 1, now + HOUR_MS + 1, zone)[0][0]  # the next whole hour: the current one is drawn
    charts: list[tuple[str, Callable[[int], list[str]]]] = []
    if burnup_lines(snap, screen, BURNUP_LINES):
        charts.append((f"5-hour window - {burnup_subject(snap, now)}",
                       lambda height: burnup_lines(snap, screen, min(BURNUP_LINES, height))))
    for title, days in ((f"{kind.capitalize()} per hour - last 24 hours", 1),
                        (f"{kind.capitalize()} - last 7 days", 7)):
        charts.append((title, lambda height, days=days: time_chart(points, end - days * DAY_MS, end, HOUR_MS, width,
                                                                   min(TIME_CHART_LINES, height), unicode, zone,
                                                                   format_value)))
    week = claude_week(snap, series.readings, end)
    if week is not None:
        readings, start, stop = week
        charts.append((f"Claude's week - {kind} per day",
                       lambda height: week_chart(start, stop, readings, points, width,
                                                 min(WEEK_CHART_LINES, height), unicode, zone, format_value)))
    elif snap.limits is not None and screen.settings.weekly_limit and snap.query.project is None and \
            snap.query.agent in (None, CLAUDE_CODE) and snap.limits.user == snap.query.user:
        # the limit is the account's: Claude Code's whole usage, of the user the points are of (on a team's server
        # the week may count one user's usage while the points are everyone's)
        charts.append(("Last 7 days against your weekly limit",
                       lambda height: rolling_week_lines(snap, screen, min(BURNUP_LINES, height))))
    charts.append((f"{kind.capitalize()} by weekday and hour - last {CHART_WEEKS} weeks",
                   lambda height: heatmap_at(points, width, height, unicode, zone, format_value)))
    return charts


def claude_week(snap: Snapshot, readings: Iterable[LimitReading],
                end: int) -> tuple[list[LimitReading], int, int] | None:
    """The week to draw against Claude's weekly limit: its readings, start and end. Claude's week while a reading
    of it is live, else the last 7 days; the readings of one user (the account GetLimits counts, where it names
    one, as the gauge does; else week_user: the filtered one, else the newest weekly reading's); None without any
    weekly reading in it."""
    weekly = [r for r in readings if r.seven_day is not None]
    if not weekly:
        return None
    user = snap.limits.user if snap.limits and snap.limits.user is not None else week_user(weekly)
    start, stop = snap.limits.weekly_window if snap.limits and snap.limits.weekly_window else (end - 7 * DAY_MS, end)
    mine = [r for r in weekly if r.user == user and start <= r.read_ms < stop]
    return (mine, start, stop) if mine else None


def heatmap_at(points: list[tuple[int, float]], width: int, height: int, unicode: bool, zone: ZoneInfo,
               format_value: Callable[[float], str]) -> list[str]:
    """The heatmap, if it fits in `height` lines ([] if not: it does not shrink, each day is a row)."""
    lines = heatmap(points, width, unicode, zone, format_value)
    return lines if len(lines) <= height else []


def requests_lines(snap: Snapshot, state: ViewState, screen: Screen) -> Frame:
    page: RequestsPage = snap.data.page
    long_period = snap.query.start_ms is None or snap.query.end_ms - snap.query.start_ms > 86400_000
    time_format, time_width = ("%m-%d %H:%M", 11) if long_period else ("%H:%M:%S", 8)
    columns = [Column("Time", time_width, 0, left=True), Column("Agent", 6, 2, left=True),
               Column("Model", 10, 0, left=True), Column("Input", 7, 3), Column("Output", 7, 3), Column("Cache", 7, 4),
               Column("Total", 7, 1), Column("Cost", 9, 1), Column("Dur", 6, 5), Column("Session", 8, 6, left=True)]
    page_rows = max(1, screen.rows - 2)
    shown = page.requests[state.scroll - snap.query.offset:][:page_rows] if state.scroll >= snap.query.offset else ()
    rows = [([local_time(r.ts_ms, screen.settings.zone, time_format), agent_names(r.agent), model_names(r.model),
              format_count(r.usage.input), format_count(r.usage.output), format_count(r.usage.cache),
              format_count(r.usage.total), format_cost(r.usage.cost_nanos), format_duration(r.usage.duration_ms),
              session_names(r.session_id)], "")
            for r in shown]
    if len({r.agent for r in shown}) < 2:  # Claude Code's alone (or another agent's alone): no Agent column
        columns = columns[:1] + columns[2:]
        rows = [(cells[:1] + cells[2:], style) for cells, style in rows]
    first = state.scroll + 1 if shown else 0
    title = f"Requests {first}-{state.scroll + len(shown)} of {page.total}"
    header, body = table_lines(columns, rows, screen.width)
    return Frame([rule(title, screen.width, screen.glyphs), header, *body], page_rows, page.total)


def days_with_history(days: tuple[DayUsage, ...]) -> tuple[DayUsage, ...]:
    """The days (newest first) from the first one with usage on: the empty days before history began say
    nothing. Days without usage since stay: a quiet day is a figure."""
    used = [index for index, day in enumerate(days) if day.split.total.requests]
    return days[:used[-1] + 1] if used else ()


def daily_lines(snap: Snapshot, state: ViewState, screen: Screen) -> Frame:
    days = days_with_history(snap.data)
    zone = screen.settings.zone
    columns = [Column("Date", 10, 0, left=True), Column("Base", 5, 3), Column("Prem", 5, 1), Column("Input", 6, 4),
               Column("Output", 6, 2), Column("CacheR", 6, 5), Column("CacheW", 6, 5), Column("Total", 6, 2),
               Column("Avg rate", 9, 6), Column("Cost", 9, 1), Column("Prem $", 9, 3)]
    rows, total = [], Split()
    for usage in days:
        total = total + usage.split
        day = dt.date.fromisoformat(usage.date)
        day_start, next_day = (ms_from_datetime(dt.datetime.combine(d, dt.time(), zone))
                               for d in (day, day + dt.timedelta(days=1)))
        elapsed_ms = min(screen.now, next_day) - day_start  # DST days have 23 or 25 hours
        rows.append(_daily_cells(usage.date, usage.split,
                                 format_rate(per_minute(usage.split.premium.limited, elapsed_ms))))
    page_rows = max(1, screen.rows - 3)
    shown = days[state.scroll:state.scroll + page_rows]
    body_rows = [(cells, "") for cells in rows[state.scroll:state.scroll + page_rows]]
    body_rows.append((_daily_cells("Total", total, ""), "bold"))
    if not days:
        return Frame([rule(f"Daily usage - last 30 days ({zone.key})", screen.width, screen.glyphs),
                      [("No usage in the last 30 days.", "dim")]], page_rows, 0)
    with_bars = bar_room(columns, [cells for cells, _ in body_rows], screen.width)
    header, body = table_lines(columns, body_rows, screen.width - (DAILY_BAR_LEAST + 1) * with_bars)
    if with_bars:  # a bar beside each day, its length its share of the costliest day's cost (the total has none)
        bar_width = screen.width - len(header[0][0]) - 1
        largest = max(day.split.total.cost_nanos for day in days)
        scale = format_cost(largest)
        header = [(header[0][0] + " " + joined_to_fit(["", (f"Cost, longest {scale}", f"longest {scale}", scale)],
                                                      bar_width), "header")]
        body = [line + [(" " + hbar(day.split.total.cost_nanos, largest, bar_width, screen.glyphs.unicode), "")]
                if day.split.total.cost_nanos else line for line, day in zip(body, shown)] + body[len(shown):]
    title = f"Daily usage - last {plural(len(days), 'day')} ({zone.key})"
    return Frame([rule(title, screen.width, screen.glyphs), header, *body], page_rows, len(days))


DAILY_BAR_LEAST = 16  # the Daily tab's cost bars are at least this wide, or step aside
DAILY_BAR_KEEPS = 3  # and never take the place of a column of this priority or a more important one


def bar_room(columns: list[Column], rows: list[list[Cell]], width: int) -> bool:
    """Whether bars DAILY_BAR_LEAST wide fit beside the table and leave it every column it shows of priority
    DAILY_BAR_KEEPS or more important: the figures come before their picture."""
    def kept(fitted: list[Fitted]) -> set[int]:
        return {f.index for f in fitted if f.column.priority <= DAILY_BAR_KEEPS}
    return kept(fit_columns(columns, rows, width - DAILY_BAR_LEAST - 1)) == kept(fit_columns(columns, rows, width))


def _daily_cells(label: str, split: Split, rate: str) -> list[str]:
    p = split.premium
    return [label, format_count(split.base.requests), format_count(p.requests), format_count(p.input),
            format_count(p.output), format_count(p.cache_read), format_count(p.cache_creation),
            format_count(p.total), rate, format_cost(split.total.cost_nanos), format_cost(p.cost_nanos)]


def share_cell(part: int, whole: int, glyphs: Glyphs, width: int = 8) -> str:
    fraction = part / whole if whole else 0.0
    return f"{bar(fraction, width, glyphs)} {format_percent(fraction * 100):>4}"


def average_ms(total_ms: int, count: int) -> str:
    return format_duration(total_ms // count) if count else "-"


def models_lines(snap: Snapshot, state: ViewState, screen: Screen) -> Frame:
    models: tuple[ModelUsage, ...] = snap.data
    columns = [Column("Model", 10, 0, left=True), Column("Req", 6, 1), Column("Input", 7, 3),
               Column("Output", 7, 3), Column("Cache", 7, 4), Column("Cost", 9, 1), Column("Share of cost", 13, 2),
               Column("Avg dur", 7, 5), Column("TTFT", 6, 6)]
    total = sum((m.usage for m in models), Usage())
    rows = [([model_names(m.model), format_count(m.usage.requests), format_count(m.usage.input),
              format_count(m.usage.output), format_count(m.usage.cache), format_cost(m.usage.cost_nanos),
              share_cell(m.usage.cost_nanos, total.cost_nanos, screen.glyphs),
              average_ms(m.usage.duration_ms, m.usage.requests), average_ms(m.usage.ttft_ms, m.usage.ttft_count)], "")
            for m in models]
    page_rows = max(1, screen.rows - 3)
    shown = rows[state.scroll:state.scroll + page_rows]
    shown.append((["Total", format_count(total.requests), format_count(total.input), format_count(total.output),
                   format_count(total.cache), format_cost(total.cost_nanos), "", average_ms(total.duration_ms,
                   total.requests), average_ms(total.ttft_ms, total.ttft_count)], "bold"))
    header, body = table_lines(columns, shown, screen.width)
    title = f"Models - {PERIODS[state.period][0]}"
    return Frame([rule(title, screen.width, screen.glyphs), header, *body], page_rows, len(rows))


def sessions_or_timeline(client: Client, query: Query) -> tuple[Session, ...] | tuple[TimelineEntry, ...]:
    """The period's sessions, or the timeline of the one opened with Enter."""
    if query.session_id:
        return client.timeline(query.session_id)
    return client.sessions(query.start_ms, query.end_ms, query.user, project=query.project, agent=query.agent)


def sessions_lines(snap: Snapshot, state: ViewState, screen: Screen) -> Frame:
    if state.session_id:
        return timeline_lines(snap, state, screen)
    sessions: tuple[Session, ...] = snap.data
    several_users = len({row.user for row in sessions}) > 1
    labels = project_labels(row.project for row in sessions)
    columns = [Column("Session", 8, 0, left=True), Column("User", 14, 6, left=True),
               Column("Project", 10, 6, left=True), Column("Agent", 6, 2, left=True),
               Column("Started", 11, 2, left=True), Column("Dur", 6, 4),
               Column("Req", 5, 1), Column("Tokens", 7, 3),
               Column("Cost", 9, 0), Column("Models", 20, 5, left=True), Column("Tools", 5, 7),
               Column("Fail", 4, 7), Column("Err", 4, 7), Column("Source", 7, 8, left=True)]
    page_rows = max(1, screen.rows - 2)
    top = min(max(0, state.scroll - page_rows // 2), max(0, len(sessions) - page_rows))
    rows = []
    for index, row in enumerate(sessions[top:top + page_rows], start=top):
        total = row.split.total
        models = tuple(",".join(names) for names in zip(*map(model_names, row.models))) or ""  # long to short
        rows.append(([session_names(row.session_id), user_names(row.user),
                      project_forms(row.project, labels) if row.project else "-", agent_names(row.agent),
                      local_time(row.first_ms, screen.settings.zone, "%m-%d %H:%M"),
                      format_duration(row.last_ms - row.first_ms), format_count(total.requests),
                      format_count(total.total), format_cost(total.cost_nanos), models, str(row.tool_calls),
                      str(row.tool_failures), str(row.api_errors), row.source],
                     "tab_active" if index == state.scroll else ""))
    shown = [i for i in range(len(columns))  # one person's server: no User column; no projects: no Project column;
             if (i != 1 or several_users) and (i != 2 or any(row.project for row in sessions))  # one agent: no Agent
             and (i != 3 or len({row.agent for row in sessions}) > 1)]
    columns = [columns[i] for i in shown]
    rows = [([cells[i] for i in shown], style) for cells, style in rows]
    header, body = table_lines(columns, rows, screen.width)
    title = f"Sessions - {PERIODS[state.period][0]} ({len(sessions)}) - Enter: details"
    return Frame([rule(title, screen.width, screen.glyphs), header, *body], page_rows, len(sessions),
                 tuple(row.session_id for row in sessions))


# Attributes that say who, where and in answer to which prompt: on every event, never what happened in it.
CONTEXT_PREFIXES = ("anthropic.", "event.", "session.", "user.", "organization.", "terminal.")
CONTEXT_KEYS = {"prompt.id"}


def one_line(value: Any) -> str:
    """An attribute's value on one line: prompts and error messages may hold newlines and tabs."""
    return " ".join(str(value).split())


def duration_text(ms: str) -> str:
    try:
        return format_duration(int(float(ms)))
    except (ValueError, OverflowError):  # not a number, or infinite
        return "?"


def event_detail(kind: str, attributes: dict[str, str]) -> str:
    """What a person looks for first in an event: how a tool call went, why a request failed, a prompt."""
    a = attributes
    if kind in TOOL_CALL_EVENTS:
        success = a.get("success", "").lower()
        outcome = "ok" if success in ("true", "1") else "failed" if success in ("false", "0") else "done"
        error = f": {a['error']}" if a.get("error") else ""
        return f"{outcome}, {duration_text(a.get('duration_ms', '?'))}{error}"
    if kind == "tool_decision":
        return f"{a.get('decision', '?')} ({a.get('source', '?')})"
    if kind in API_ERROR_EVENTS:
        attempt = f" (attempt {a['attempt']})" if "attempt" in a else ""
        return f"status {a.get('status_code', '?')}: {a.get('error', '')}{attempt}"
    if kind == "user_prompt":
        prompt = f": {a['prompt']}" if a.get("prompt") else ""
        return f"{a.get('prompt_length', '?')} characters{prompt}"
    return ", ".join(f"{key}={value}" for key, value in sorted(a.items()) if key not in ("model", "tool_name"))


def timeline_cells(row: TimelineEntry) -> tuple[Cell, str, str]:
    """(model or tool, cost, detail) for one timeline entry; a request's tokens and time are its detail."""
    if row.request is not None:
        u = row.request.usage
        return (model_names(row.request.model), format_cost(u.cost_nanos),
                f"in {format_count(u.input)} out {format_count(u.output)} cache {format_count(u.cache)}, "
                f"{format_duration(u.duration_ms)}")
    attributes = {key: one_line(value) for key, value in row.details.items()
                  if not key.startswith(CONTEXT_PREFIXES) and key not in CONTEXT_KEYS}
    what = attributes.get("tool_name", attributes.get("function_name", "")) \
        if row.kind in TOOL_CALL_EVENTS or "model" not in attributes else model_names(attributes["model"])
    return what, "", event_detail(row.kind, attributes)


def timeline_lines(snap: Snapshot, state: ViewState, screen: Screen) -> Frame:
    timeline: tuple[TimelineEntry, ...] = snap.data
    columns = [Column("Time", 8, 0, left=True), Column("Event", 18, 0, left=True),
               Column("Model/tool", 10, 2, left=True), Column("Cost", 9, 2), Column("Detail", 10, 1, left=True)]
    page_rows = max(1, screen.rows - 2)
    rows = [([local_time(row.ts_ms, screen.settings.zone, "%H:%M:%S"), row.kind, *timeline_cells(row)], "")
            for row in timeline[state.scroll:state.scroll + page_rows]]
    header, body = table_lines(columns, rows, screen.width)
    title = f"Session {state.session_id} ({len(timeline)} entries) - Esc: back"
    return Frame([rule(title, screen.width, screen.glyphs), header, *body], page_rows, len(timeline))


def tools_lines(snap: Snapshot, state: ViewState, screen: Screen) -> Frame:
    data: ToolReport = snap.data
    width, glyphs = screen.width, screen.glyphs
    page_rows = max(1, screen.rows - 6 - min(len(data.errors), 3))  # room below for decisions and errors
    tools = [([t.tool, format_count(t.calls), format_percent(t.successes / t.calls * 100) if t.calls else "-",
               format_duration(t.p50_ms), format_duration(t.p95_ms)], "" if t.successes == t.calls else "warn")
             for t in data.tools[state.scroll:state.scroll + page_rows]]
    header, body = table_lines([Column("Tool", 12, 0, left=True), Column("Calls", 6, 0),
                                Column("Success", 7, 0), Column("p50", 6, 1), Column("p95", 6, 1)], tools, width)
    lines = [rule(f"Tools - {PERIODS[state.period][0]}", width, glyphs), header, *body]
    decisions = "  ".join(f"{d.decision} by {d.source}: {d.count}" for d in data.decisions)
    lines.append([("Decisions: " + (decisions or "none"), "")])
    errors = [([e.status_code, model_names(e.model), format_count(e.count)], "bad") for e in data.errors]
    header, body = table_lines([Column("Status", 6, 0, left=True), Column("Model", 10, 0, left=True),
                                Column("Errors", 6, 0)], errors, width)
    lines += [rule("API errors", width, glyphs), header, *body,
              [(f"Retries exhausted: {data.retries_exhausted}", "bad" if data.retries_exhausted else "")]]
    return Frame(lines[:max(0, screen.rows)], page_rows, len(data.tools))


def users_lines(snap: Snapshot, state: ViewState, screen: Screen) -> Frame:
    columns = [Column("User", 14, 0, left=True), Column("Sessions", 8, 2), Column("Req", 6, 1),
               Column("Tokens", 7, 1), Column("Premium", 7, 3), Column("Cost", 9, 0), Column("Share of cost", 13, 2)]
    whole = sum(u.split.total.cost_nanos for u in snap.users)
    page_rows = max(1, screen.rows - 2)
    claude = {u.user: [live_window(u.five_hour, screen.now), live_window(u.seven_day, screen.now)] for u in snap.users}
    with_claude = any(window for windows in claude.values() for window in windows)
    if with_claude:  # each user's own latest share of Claude's windows, where a reading of it is live
        columns += [Column("5h", 4, 1), Column("Week", 4, 1)]
    plans = {u.user: {(reading.agent, name): live_window(getattr(reading, name), screen.now) for reading in u.agents
                      for name in ("five_hour", "seven_day")} for u in snap.users}  # other agents' (Codex's) the same
    shown = sorted({key for windows in plans.values() for key, window in windows.items() if window},
                   key=lambda key: (AGENTS.index(key[0]), key[1]))
    columns += [Column(f"{LIMITS_OF[agent]} {'5h' if name == 'five_hour' else 'week'}", 8, 2) for agent, name in shown]
    rows = [([user_names(u.user, "(unknown)"), str(u.sessions), format_count(u.split.total.requests),
              format_count(u.split.total.total), format_count(u.split.premium.limited),
              format_cost(u.split.total.cost_nanos), share_cell(u.split.total.cost_nanos, whole, screen.glyphs)] +
             ([format_percent(window.percent) if window else "-" for window in claude[u.user]] if with_claude else []) +
             [format_percent(window.percent) if (window := plans[u.user].get(key)) else "-" for key in shown],
             "tab_active" if u.user and u.user == state.user else "")
            for u in snap.users[state.scroll:state.scroll + page_rows]]
    header, body = table_lines(columns, rows, screen.width)
    title = f"Users by cost - {PERIODS[state.period][0]} - u: filter by user"
    return Frame([rule(title, screen.width, screen.glyphs), header, *body], page_rows, len(snap.users))


def projects_lines(snap: Snapshot, state: ViewState, screen: Screen) -> Frame:
    columns = [Column("Project", 14, 0, left=True), Column("Sessions", 8, 2), Column("Req", 6, 1),
               Column("Tokens", 7, 1), Column("Cost", 9, 0), Column("Share of cost", 13, 2)]
    whole = sum(p.split.total.cost_nanos for p in snap.projects)
    labels = project_labels(p.project for p in snap.projects)
    page_rows = max(1, screen.rows - 2)
    rows = [([project_forms(p.project, labels), str(p.sessions), format_count(p.split.total.requests),
              format_count(p.split.total.total), format_cost(p.split.total.cost_nanos),
              share_cell(p.split.total.cost_nanos, whole, screen.glyphs)],
             "tab_active" if p.project and p.project == state.project else "")
            for p in snap.projects[state.scroll:state.scroll + page_rows]]
    header, body = table_lines(columns, rows, screen.width)
    title = f"Projects by cost - {PERIODS[state.period][0]} - p: filter by project"
    return Frame([rule(title, screen.width, screen.glyphs), header, *body], page_rows, len(snap.projects))


def blocks_lines(snap: Snapshot, state: ViewState, screen: Screen) -> Frame:
    blocks: tuple[UsageBlock, ...] = snap.data
    zone = screen.settings.zone
    # the limit in force, where it is of the usage shown (on a team's server it may be one user's account's)
    limit = snap.limits.limit if snap.limits and snap.limits.user == snap.query.user else screen.settings.limit
    columns = [Column("Block", 17, 0, left=True), Column("Req", 5, 1), Column("Premium", 7, 0),
               Column("Tokens", 7, 2), Column("Cost", 9, 0), Column("Of limit", 13, 1)]
    page_rows = max(1, screen.rows - 2)
    rows = []
    for block in blocks[state.scroll:state.scroll + page_rows]:
        start, end, split = block.start_ms, block.end_ms, block.split
        used = split.premium.limited
        share = share_cell(used, limit, screen.glyphs) if limit else "-"
        label = f"{local_time(start, zone, '%m-%d %H:%M')}-{local_time(end, zone)}"
        rows.append(([label, format_count(split.total.requests), format_count(used), format_count(split.total.total),
                      format_cost(split.total.cost_nanos), share], "good" if start <= screen.now < end else ""))
    header, body = table_lines(columns, rows, screen.width)
    title = f"Blocks - {PERIODS[state.period][0]} ({len(blocks)}; 5 hours from the first request)"
    return Frame([rule(title, screen.width, screen.glyphs), header, *body], page_rows, len(blocks))


@dataclasses.dataclass(frozen=True)
class Tab:
    """One monitor tab, described once: the tab strip, digit keys, help and footer all come from TABS."""
    name: str                                                   # ViewState.tab and Query.tab
    title: str                                                  # in the tab strip
    short_title: str                                            # on narrow screens, after the tab's digit
    render: Callable[[Snapshot, ViewState, Screen], Frame]      # its lines below the block figures
    fetch: Callable[[Client, Query], Any] | None = None         # its Snapshot.data, if it needs any
    summary: Callable[[Snapshot, ViewState, Screen, bool], list[Line]] | None = None  # its lines above them, in
    # all its rows; in one line when compact
    fixed_period: str = ""                                      # shown whatever the period keys chose
    burnup: bool = False                                        # it draws the 5-hour window's burn-up


TABS = {tab.name: tab for tab in (
    Tab("current", "Current", "Now", current_lines, current_requests, summary=usage_lines, burnup=True),
    Tab("daily", "Daily Usage", "Day", daily_lines,
        lambda client, q: client.days(None, q.end_ms, q.timezone, q.user, q.project, q.agent),
        fixed_period="last 30 days"),
    Tab("models", "Models", "Mod", models_lines,
        lambda client, q: client.models(q.start_ms, q.end_ms, q.user, q.project, q.agent)),
    Tab("sessions", "Sessions", "Ses", sessions_lines, sessions_or_timeline),
    Tab("tools", "Tools & errors", "Tool", tools_lines,
        lambda client, q: client.tools(q.start_ms, q.end_ms, q.user, q.project, q.agent)),
    Tab("users", "Users", "User", users_lines),  # every snapshot has the users
    Tab("blocks", "Blocks", "Blk", blocks_lines,
        lambda client, q: tuple(reversed(client.blocks(q.start_ms, q.end_ms, q.user, q.project)))  # newest first
        if q.agent in (None, CLAUDE_CODE) else ()),  # Claude's windows: no other agent's
    Tab("projects", "Projects", "Proj", projects_lines),  # every snapshot has the projects
    Tab("charts", "Charts", "Cht", charts_lines,
        chart_series, fixed_period=f"last {CHART_WEEKS} weeks by the hour", burnup=True),
)}
TAB_KEYS = f"1-{min(len(TABS), 9)}"  # the digit keys; Tab reaches every tab

WAITING_TEXT = [
    "Waiting for data: this server has not received any Claude Code request yet.",
    "",
    "Start Claude Code with these variables set:",
    "  export CLAUDE_CODE_ENABLE_TELEMETRY=1",
    "  export OTEL_LOGS_EXPORTER=otlp",
    "  export OTEL_METRICS_EXPORTER=otlp",
    "  export OTEL_EXPORTER_OTLP_PROTOCOL=grpc",
    "  export OTEL_EXPORTER_OTLP_ENDPOINT=http://{server}",
    "",
    "Requests appear here a few seconds after Claude Code makes them.",
]
READING_TEXT = [
    "Reading the transcripts and histories on this machine,",
    "the newest first: {read}.",
    "",
    "Figures appear as they are stored.",
]
HELP_TEXT = [  # at most 36 characters a line: the help box fits 40 columns
    "h  last hour       d  last 24 hours",
    "w  last 7 days     m  last 30 days",
    "a  all time        b  current block",
    "o  sort order      r  refresh now",
    f"Tab/Shift-Tab or {TAB_KEYS}  switch tab",
    "arrows/j/k PgUp/PgDn  scroll",
    "Home/End  first, last row",
    "Enter/Esc  open/close a session",
    "u/p/g  next user, project, agent",
    "c  Charts: cost or tokens",
    "?  this help       q  quit",
]
FOOTER = f"h/d/w/m/a/b period  o order  Tab/{TAB_KEYS} tab  u user  p project  ? help  q quit"
FOOTER_SHORT = ("h/d/w/m/a/b", "o", TAB_KEYS, "u/p", "? help", "q quit")  # dropped whole, "o" first, to fit
HELP_FOOTER = "any key closes this help"
HELP_FOOTER_MORE = "arrows/PgDn: more  other keys close"


def footer_hint(width: int) -> str:
    """The key hints that fit in `width` - 1 (curses never writes the bottom-right cell): whole hints, the least
    needed dropped first."""
    if len(FOOTER) < width:
        return FOOTER
    hints = list(FOOTER_SHORT)
    for least_needed in ("o", "u/p", "h/d/w/m/a/b", TAB_KEYS):
        if len("  ".join(hints)) < width:
            break
        hints.remove(least_needed)
    return "  ".join(hints)


def boxed(text: list[str], width: int, height: int, glyphs: Glyphs, title: str = "", top: int = 0) -> list[Line]:
    """`text` in a box centred in `width`, at most `height` lines, from its line `top`. When it does not all
    fit, the bottom edge says which lines show."""
    inner = min(width - 2, max(len(t) for t in [*text, title]) + 2)
    rows = max(0, height - 2)
    top = min(top, max(0, len(text) - rows))
    shown = text[top:top + rows]
    where = f" {top + 1}-{top + len(shown)} of {len(text)} " if len(shown) < len(text) else ""
    top_left, top_right, bottom_left, bottom_right, side = glyphs.box
    margin = " " * max(0, (width - inner - 2) // 2)

    def edge(left: str, label: str, right: str) -> Line:
        return [(margin + left + (glyphs.rule + label).ljust(inner, glyphs.rule)[:inner] + right, "header")]

    body = [edge(top_left, f" {title} " if title else "", top_right)]
    body += [[(margin + side + " " + t[:inner - 2].ljust(inner - 1) + side, "")] for t in shown]
    return body + [edge(bottom_left, where, bottom_right)]


def lines_above_the_table(tab: Tab, snap: Snapshot, state: ViewState, screen: Screen) -> list[Line]:
    """The tab's summary and the block/week panel, as much of them as leaves the tab's table TABLE_ROWS_FIRST data
    rows (below its title, header and total): the panel first shrinks to one line, then the summary to one,
    then the panel steps aside."""
    for panel_rows, compact in ((4, False), (3, False), (1, False), (1, True), (0, True)):
        panel = limit_gauge_lines(snap, screen, panel_rows)
        summary = tab.summary(snap, state, dataclasses.replace(screen, rows=screen.rows - len(panel)), compact) \
            if tab.summary else []
        if screen.rows - len(panel) - len(summary) >= TABLE_CHROME + TABLE_ROWS_FIRST:
            break
    return summary + panel


def render(state: ViewState, status: ServerStatus, snap: Snapshot | None, screen: Screen) -> Frame:
    """The whole screen as at most `screen.rows` lines of at most `screen.width` characters."""
    width, height = screen.width, screen.rows
    if width < MIN_SIZE[0] or height < MIN_SIZE[1]:
        return Frame([[(f"terminal too small: {width}x{height}, need {MIN_SIZE[0]}x{MIN_SIZE[1]}"[:width], "bad")]])
    tab_frame = Frame([])
    lines = header_lines(state, status, snap, screen)
    room = height - len(lines) - 1
    hint = footer_hint(width)
    if state.help:
        tab_frame = Frame([], max(1, room - 2), len(HELP_TEXT))  # the box pages through the help like a table
        lines += boxed(HELP_TEXT, width, room, screen.glyphs, "Keys", state.help_scroll)
        hint = HELP_FOOTER if len(HELP_TEXT) <= tab_frame.page_rows else HELP_FOOTER_MORE
    elif snap is None:
        message = "Connecting to the ccmon server..." if status.attempts == 0 else \
            f"Cannot reach the ccmon server at {screen.settings.server}: {printable(status.error)}. " \
            "Is 'ccmon --server' running?"
        lines += [[("", "")], *([(text, "warn")] for text in message_lines(message, width))]
    elif snap.server_requests == 0 and snap.history:
        lines += boxed([t.format(read=files_read(snap.history)) for t in READING_TEXT], width, room, screen.glyphs)
    elif snap.server_requests == 0:
        lines += boxed([t.format(server=screen.settings.server) for t in WAITING_TEXT], width, room, screen.glyphs)
    elif (state.tab, state.session_id) != (snap.query.tab, snap.query.session_id):  # another tab's data
        lines += limit_gauge_lines(snap, screen) + [[("Loading...", "dim")]]
    elif snap.unanswered:
        lines += limit_gauge_lines(snap, screen) + [[("", "")], [(f"This tab needs ccmon's own server: {snap.unanswered}.",
                                                            "warn")]]
    else:
        tab = TABS[state.tab]
        above = lines_above_the_table(tab, snap, state, dataclasses.replace(screen, rows=room))
        tab_frame = tab.render(snap, state, dataclasses.replace(screen, rows=room - len(above)))
        lines += above + tab_frame.lines
    lines = lines[:height - 1]
    lines += [[("", "")]] * (height - 1 - len(lines)) + [[(state.notice or hint, "warn" if state.notice else "dim")]]
    return Frame([clip(line, width) for line in lines], tab_frame.page_rows, tab_frame.total_rows,
                 tab_frame.session_ids, tuple(u.user for u in snap.users) if snap else (),
                 tuple(p.project for p in snap.projects) if snap else (), snap.agents if snap else ())


# ---------------------------------------------------------------- Curses loop: polling thread, keys, drawing

HISTORY_REFRESH_S = 1  # how often the screen follows the local server's first reading of the transcripts


class Poller:
    """Fetches snapshots in the background so the screen never waits on the network."""

    def __init__(self, client: Client, settings: MonitorSettings):
        self.client, self.settings = client, settings
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._state = ViewState()
        self.snapshot: Snapshot | None = None
        self.status = ServerStatus()
        self.version = 0  # bumps on every new snapshot or connection change
        threading.Thread(target=self._run, name="ccmon-poller", daemon=True).start()

    def request(self, state: ViewState) -> None:
        with self._lock:
            self._state = state
        self._wake.set()

    def latest(self) -> tuple[Snapshot | None, ServerStatus, int]:
        with self._lock:
            return self.snapshot, self.status, self.version

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                state = self._state
            self._wake.clear()
            window = self.snapshot.limits.window if self.snapshot and self.snapshot.limits else None
            query = query_for(state, self.settings, now_ms(), window[0] if window else None)
            try:
                snapshot = fetch_snapshot(self.client, query)
                with self._lock:
                    self.snapshot, self.status = snapshot, ServerStatus(connected=True, attempts=1)
                    self.version += 1
                wait = min(HISTORY_REFRESH_S, self.settings.refresh_s) if snapshot.history else self.settings.refresh_s
            except ServerUnreachable as exc:
                failures = self.status.attempts + 1 if not self.status.connected else 1
                wait = min(2 ** (failures - 1), 30, self.settings.refresh_s * 6)
                with self._lock:
                    self.status = ServerStatus(False, str(exc), now_ms() + wait * 1000, failures)
                    self.version += 1
            self._wake.wait(wait)


CURSES_STYLES = {"alert": ("white", "red", True), "title": ("white", "blue", True), "tab_active": ("black", "cyan", True), "tab": (None, None, False),
                 "header": (None, None, True), "bold": (None, None, True), "good": ("green", None, False),
                 "warn": ("yellow", None, False), "bad": ("red", None, True), "dim": (None, None, False),
                 "rule": ("cyan", None, False), "": (None, None, False)}


def curses_attributes(curses_module, use_color: bool) -> dict[str, int]:
    attributes = {}
    for number, (style, (fg, bg, bold)) in enumerate(CURSES_STYLES.items(), start=1):
        attr = curses_module.A_BOLD if bold else 0
        if style in ("title", "tab_active", "header", "alert") and not use_color:
            attr |= curses_module.A_REVERSE if style != "header" else curses_module.A_UNDERLINE
        if use_color and (fg or bg):
            colour = lambda name: getattr(curses_module, f"COLOR_{name.upper()}") if name else -1
            curses_module.init_pair(number, colour(fg), colour(bg))
            attr |= curses_module.color_pair(number)
        attributes[style] = attr
    return attributes


def key_name(curses_module, key: int) -> str:
    if key == 3:
        return "^C"
    if key == 27:
        return "ESC"
    if key >= 256 or key < 0:
        try:
            return curses_module.keyname(key).decode()
        except (ValueError, curses_module.error):
            return ""
    return chr(key)


def draw(curses_module, window, lines: list[Line], attributes: dict[str, int]) -> None:
    window.erase()
    height, width = window.getmaxyx()
    for y, line in enumerate(lines[:height]):
        x = 0
        for text, style in line:  # names from telemetry are anyone's text: shown, never obeyed
            text = printable(text)[:width - x - (1 if y == height - 1 else 0)]  # never the bottom-right cell
            if text:
                window.addstr(y, x, text, attributes.get(style, 0))
            x += len(text)
    window.noutrefresh()
    curses_module.doupdate()  # one update per frame: no flicker


def due_alerts(limits: LimitFigures | None, settings: MonitorSettings, now: int,
               fired: set[tuple]) -> list[tuple[tuple, str, dict[str, str]]]:
    """Thresholds that block or weekly usage has newly crossed: (key, message, environment for the command).
    While a reading of Claude's own window is live, the percentage is Claude's (as read; used and limit are then
    ccmon's tokens in the window and its calibrated capacity, where known); else ccmon's count against the
    limit. A window's thresholds fire once per window; a rolling week's again after usage fell back below them."""
    if limits is None or not settings.alerts:
        return []
    gauges: list[tuple[str, int, float, int | None, int | None, str]] = []  # kind, window, percent, used, limit, source
    status = block_status(limits, now)
    five, seven = limits.claude.window("five_hour", now), limits.claude.window("seven_day", now)
    if five is not None:
        gauges.append(("block", five.resets_ms - BLOCK_MS, five.percent, status.used if status else None,
                       limits.claude.five_hour_capacity, "claude"))
    elif status is not None and status.limit:
        gauges.append(("block", status.start_ms, status.used / status.limit * 100, status.used, status.limit, "ccmon"))
    weekly_used = weekly_premium(limits).limited
    if seven is not None:
        gauges.append(("weekly", seven.resets_ms, seven.percent, weekly_used, limits.claude.seven_day_capacity,
                       "claude"))
    elif settings.weekly_limit:
        gauges.append(("weekly", 0, weekly_used / settings.weekly_limit * 100, weekly_used, settings.weekly_limit,
                       "ccmon"))
    due = []
    for kind, window, percent, used, limit, source in gauges:
        for threshold in settings.alerts:
            key = (kind, claude_window_key(window), threshold)
            if percent < threshold:
                fired.discard(key)  # re-arms a rolling window's alert
            elif key not in fired:
                fired.add(key)
                figures = f"Claude says {format_percent(percent)}" if source == "claude" else \
                    f"{format_count(used)} of {format_count(limit)}"
                due.append((key, f"ALERT: {kind} usage passed {threshold}% ({figures})",
                            {"CCMON_ALERT_KIND": kind, "CCMON_ALERT_THRESHOLD": str(threshold),
                             "CCMON_ALERT_PERCENT": f"{percent:.1f}", "CCMON_ALERT_USED": "" if used is None else str(used),
                             "CCMON_ALERT_LIMIT": "" if limit is None else str(limit), "CCMON_ALERT_SOURCE": source}))
    return due


def alert_setup_problem(settings: MonitorSettings) -> str:
    """Alerts need something to measure against; say so rather than stay silent."""
    if settings.alerts and not settings.weekly_limit and (settings.block_mode is None or
                                                          not (settings.limit or settings.learn)):
        return ("alerts need a block limit (-b with claude.plan or claude.max_tokens), claude.weekly_max_tokens "
                "or Claude's own limits (ccmon statusline)")
    return ""


def run_alert_command(command: str, environment: dict[str, str]) -> None:
    """The user's alert_command, in the background: a slow notifier must not freeze the screen."""
    import subprocess
    try:
        subprocess.Popen(command, shell=True, env={**os.environ, **environment}, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        log.warning("alert_command failed: %s", exc)


@contextlib.contextmanager
def terminal(curses_module):
    """The terminal in curses mode as (window, style attributes, glyphs), restored however the monitor ends."""
    unicode = utf8_locale()  # it sets the locale before initscr, so curses writes the terminal's encoding
    # Ctrl-C quits the monitor even when it was started with SIGINT ignored (by a parent that ignores it, such as a
    # test runner's worker): Python keeps an inherited SIG_IGN, and the key would do nothing.
    interrupt = signal.signal(signal.SIGINT, signal.default_int_handler)
    # The terminal's own size, not $COLUMNS and $LINES: exported (by a test runner's worker, a script), curses
    # would take them for the size and draw every resize wrong.
    pinned = {name: os.environ.pop(name) for name in ("COLUMNS", "LINES") if name in os.environ}
    window = curses_module.initscr()
    try:
        curses_module.noecho()
        curses_module.cbreak()
        window.keypad(True)
        if curses_module.tigetstr("civis"):  # terminals that cannot hide the cursor raise instead
            curses_module.curs_set(0)
        curses_module.set_escdelay(25)  # Esc closes a session's timeline at once, not after a second
        if curses_module.has_colors():
            curses_module.start_color()
            curses_module.use_default_colors()  # the terminal's own colours as the base
        use_color = curses_module.has_colors() and "NO_COLOR" not in os.environ
        window.timeout(250)
        yield window, curses_attributes(curses_module, use_color), Glyphs.for_terminal(unicode)
    finally:
        window.keypad(False)
        curses_module.echo()
        curses_module.nocbreak()
        curses_module.endwin()
        signal.signal(signal.SIGINT, interrupt)
        os.environ.update(pinned)


def run_monitor(config: Config, notice: str = "") -> int:
    """The monitor; `notice` (such as that the local server was started) is shown until the first key."""
    import curses
    settings = MonitorSettings.from_config(config)
    client = Client.for_config(config)
    state = ViewState(period="b" if settings.block_mode is not None else "a",
                      notice="; ".join(filter(None, (notice, alert_setup_problem(settings)))))
    poller = Poller(client, settings)
    poller.request(state)
    fired: set[tuple] = set()
    try:
        with terminal(curses) as (window, attributes, glyphs):
            shown_version, shown_second, frame = -1, -1, Frame([])
            while True:
                height, width = window.getmaxyx()
                now = now_ms()
                if (poller.version, now // 1000) != (shown_version, shown_second):
                    snap, status, version = poller.latest()
                    if version != shown_version and snap is not None:
                        for _, message, environment in due_alerts(snap.limits, settings, now, fired):
                            curses.beep()
                            state = dataclasses.replace(state, notice=message)
                            if settings.alert_command:
                                run_alert_command(settings.alert_command, environment)
                    shown_version, shown_second = version, now // 1000
                    frame = render(state, status, snap, Screen(settings, width, height, now, glyphs))
                    draw(curses, window, frame.lines, attributes)
                key = window.getch()
                if key == -1:
                    continue
                if key == curses.KEY_RESIZE:
                    curses.update_lines_cols()
                    shown_version = -1
                    continue
                state, action = handle_key(state, key_name(curses, key), settings, frame)
                if action == "quit":
                    break
                if action == "refresh":
                    poller.request(state)
                shown_version = -1
    except KeyboardInterrupt:
        pass
    finally:
        poller.stop()
        client.close()
    return 0


# ---------------------------------------------------------------- CLI: arguments and entry point

COMMAND_SCOPES = {  # the settings each command reads; ccmon itself (server, monitor, quick query) reads all
    "report": ("connection", "time", "limits"),
    "statusline": ("connection", "time", "limits"),
    "import": ("connection", "time"),
    "setup": ("connection",),
    "doctor": ("connection",),
    "server": ("server", "time"),
}


def setting_help(setting: Setting) -> str:
    default = str(setting.default).lower() if isinstance(setting.default, bool) else setting.default
    notes = ([f"default {default}"] if default not in ("", [], 0) else []) + \
            ([f"also ${setting.env}"] if setting.env else []) + (["repeatable"] if setting.repeatable else [])
    return (setting.help + (f" ({'; '.join(notes)})" if notes else "")).replace("%", "%%")


def add_setting_options(parser: argparse.ArgumentParser, scopes: Iterable[str]) -> None:
    """--config, and a group of flags for each scope's settings."""
    parser.add_argument("--config", metavar="PATH", help="config file (default: ./config.{toml,yaml,yml,json}, "
                        "then ~/.ccmon/config.*)")
    for scope in scopes:
        group = parser.add_argument_group(SCOPES[scope])
        for setting in (setting for setting in SETTINGS if setting.scope == scope):
            form = {"action": "append"} if setting.repeatable else \
                {"nargs": "?", "const": "true"} if setting.read is read_switch else {}
            group.add_argument(*setting.options, dest=setting.dest, metavar=setting.metavar,
                               help=setting_help(setting), **form)


class CommandLine(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, with a suggestion for a misspelt option."""

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown and unknown.group(1).startswith("-"):
            flag = unknown.group(1).split("=")[0]
            import difflib
            close = difflib.get_close_matches(flag, list(self._option_string_actions), n=1, cutoff=0.8)
            message = f"unknown option {flag}" + (f"; did you mean {close[0]}?" if close else "")
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> CommandLine:
    parser = CommandLine(
        prog="ccmon", description="Watch what Claude Code costs: an OTLP collector (--server) and a live monitor "
        "(no mode flag).",
        epilog=f"Reports: ccmon report {{{','.join(REPORT_KINDS)}}} --help. Claude Code's status line: ccmon statusline "
               "--help. History from Claude Code's transcripts: ccmon import --help. To point Claude Code "
               "at ccmon: ccmon setup --help. The local server ccmon starts when none answers: "
               "ccmon server {status,stop}. To check the whole chain: ccmon doctor")
    parser.add_argument("-v", "--version", action="version", version=f"ccmon {VERSION}")
    modes = parser.add_argument_group("modes (none: the monitor)")
    modes.add_argument("-s", "--server", nargs="?", const=True, default=None, metavar="HOST:PORT",
                       help="run the server; with HOST:PORT, run the monitor against that server")
    modes.add_argument("-f", "--format", metavar="TEMPLATE", help="quick query: print TEMPLATE with @daily_cost, "
                       "@monthly_cost, @daily_plan_usage, ... replaced, and exit (for status bars)")
    modes.add_argument("--json", action="store_true", help="quick query: print every figure as JSON and exit")
    modes.add_argument("--agent", choices=AGENTS, help="quick query: one agent's usage only (its cost and tokens; "
                       "Claude's limits and blocks are Claude Code's)")
    modes.add_argument("--health", action="store_true", help="check that the server answers (exit 0) and exit")
    modes.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                       help="server log level (default info)")
    add_setting_options(parser, SCOPES)
    return parser


def command_parser(command: str, description: str) -> CommandLine:
    """The parser of `ccmon COMMAND`: the flags of the settings it reads, a client's defaults (no server mode,
    quiet logging)."""
    parser = CommandLine(prog=f"ccmon {command}", description=description)
    add_setting_options(parser, COMMAND_SCOPES[command])
    parser.set_defaults(server=None, log_level="warning")
    return parser


def build_report_parser() -> CommandLine:
    parser = command_parser("report", "Usage reports from a ccmon server, as a table, JSON or CSV.")
    parser.add_argument("kind", choices=REPORT_KINDS)
    parser.add_argument("--since", metavar="YYYY-MM-DD", help="first day (in monitor.timezone)")
    parser.add_argument("--until", metavar="YYYY-MM-DD", help="last day, included (default: today)")
    parser.add_argument("--user", metavar="NAME", help="only this user (user.email, account uuid or user.id)")
    parser.add_argument("--project", metavar="NAME", help="only this project: its name, folder, or the folder's "
                        "last part (proj-alpha for /home/dev/proj-alpha)")
    parser.add_argument("--agent", choices=AGENTS, help="only this agent's usage (the agent report: its row; "
                        "limits: its plan's readings)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="one JSON object")
    output.add_argument("--csv", action="store_true", help="CSV with a header row")
    output.add_argument("--chart", nargs="?", const="cost", choices=tuple(CHART_KEYS), help="tables of the "
                        f"{', '.join(CHART_REPORTS[:-1])} reports: a bar beside each row, proportional to its cost "
                        "(default) or tokens; the limits report: Claude's 5-hour and weekly %% over the period; "
                        "Unicode when the locale is UTF-8, ASCII otherwise")
    parser.add_argument("--wide", action="store_true", help=f"tables: every column, ids and times in full "
                        f"(default: fit {REPORT_WIDTH} columns)")
    return parser


def build_status_line_parser() -> CommandLine:
    parser = command_parser("statusline", "One status line for Claude Code from the JSON it writes on stdin: "
                            "Claude's own 5-hour and weekly limits, this session's cost, today's; the reading is "
                            "sent to the server too.")
    parser.add_argument("-f", "--format", metavar="TEMPLATE", help=f"the line, with @{', @'.join(STATUS_VARIABLES)} "
                        "and the --format figures of ccmon; '|'-separated parts with nothing to show are left out "
                        f"(default: {DEFAULT_STATUS_LINE!r})".replace("%", "%%"))
    return parser


def build_import_parser() -> CommandLine:
    parser = command_parser("import", "Import the API requests in Claude Code's transcripts (~/.claude/projects) "
                            "into the server: your history, every request once, costs as Claude Code's (priced "
                            "by ccmon's table when a transcript has none: estimated).")
    parser.add_argument("paths", nargs="*", metavar="PATH", help="transcript files or folders (default: "
                        "$CLAUDE_CONFIG_DIR/projects, else ~/.claude/projects and ~/.config/claude/projects)")
    parser.add_argument("--since", metavar="YYYY-MM-DD", help="only requests from this day on (monitor.timezone)")
    parser.add_argument("--dry-run", action="store_true", help="read and count, store nothing")
    parser.add_argument("--follow", action="store_true", help="keep watching and import new lines as Claude Code "
                        "writes them (until Ctrl-C)")
    parser.add_argument("--user", metavar="NAME", help=f"the user of sessions the server does not know (default: "
                        f"user.email in ${OTEL_RESOURCE_ENV}, else none)")
    return parser


def setup_agent(name: str) -> str:
    """--agent of ccmon setup: an agent's name (gemini-cli) or its first word (gemini)."""
    known = {word: agent for agent in AGENTS for word in agent_names(agent)}
    if name not in known:
        raise argparse.ArgumentTypeError(unknown_agent(name))
    return known[name]


def build_setup_parser() -> CommandLine:
    parser = command_parser("setup", "Point a coding agent at this ccmon. Claude Code (the default): in its user "
                            "settings ($CLAUDE_CONFIG_DIR/settings.json, else ~/.claude/settings.json) the env entries "
                            "that send its telemetry to the server, and statusLine running ccmon statusline. "
                            "--agent gemini|codex|qwen: that tool's own telemetry settings (the telemetry block of "
                            "~/.gemini/settings.json or ~/.qwen/settings.json, [otel] of $CODEX_HOME/config.toml). "
                            "Other keys are kept; a backup is kept for --undo.")
    words = ", ".join(agent_names(agent)[1] for agent in AGENTS)
    parser.add_argument("--agent", type=setup_agent, default=CLAUDE_CODE, metavar="AGENT", help="the agent: "
                        f"{', '.join(AGENTS)} or their first word ({words}); default {CLAUDE_CODE}")
    parser.add_argument("--dry-run", action="store_true", help="print the changes, write nothing")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--replace-status-line", action="store_true", help="replace a statusLine that is not "
                        "ccmon's (kept without this flag; Claude Code only)")
    choice.add_argument("--undo", action="store_true", help="put back what the settings were before ccmon setup")
    return parser


def build_server_command_parser() -> CommandLine:
    parser = command_parser("server", "The server of this configuration's database (~/.ccmon/ccmon.db by default), "
                            "such as the local one ccmon starts on demand: its status, or stop it. (ccmon --server "
                            "runs a server.)")
    parser.add_argument("action", choices=("status", "stop"), help="status: pid, addresses, database, log, up since "
                        "(exit 1 when not running); stop: SIGTERM, and wait for it to exit")
    return parser


def build_doctor_parser() -> CommandLine:
    parser = command_parser("doctor", "Check the chain from Claude Code to ccmon, one line per link, each saying "
                            "what holds or what to do: the config, the server (started when it is the local one and "
                            "none answers), Claude Code's telemetry settings, the telemetry received per protocol, "
                            "the status line, the transcripts. Exit 0 when all is well, else 1.")
    parser.add_argument("--json", action="store_true", help="the checks as one JSON object")
    return parser


COMMAND_PARSERS = {"report": build_report_parser, "statusline": build_status_line_parser, "import": build_import_parser,
                   "setup": build_setup_parser, "server": build_server_command_parser, "doctor": build_doctor_parser}


def without_command(argv: list[str], command: str, parser: argparse.ArgumentParser) -> list[str] | None:
    """The words without `command` when it is the first word that is neither an option nor an option's value
    (so options may come before it), else None."""
    takes_value = {flag for action in parser._actions if action.nargs not in (0, "?") for flag in action.option_strings}
    value_next = False
    for index, word in enumerate(argv):
        if value_next or word.startswith("-"):
            value_next = not value_next and word in takes_value
            continue
        return argv[:index] + argv[index + 1:] if word == command else None
    return None


def chosen_mode(args: argparse.Namespace, parser: CommandLine) -> str:
    """server, health, quick query or monitor; two of them at once is a mistake to say, not to guess at."""
    modes = [flag for flag, on in (("--server", args.server is True), ("--health", args.health),
                                   ("--format", args.format is not None), ("--json", args.json)) if on]
    if len(modes) > 1:
        parser.error(f"{modes[0]} and {modes[1]} cannot be used together")
    if args.agent and not {"--format", "--json"} & set(modes):
        parser.error("--agent is for the quick query: give --format or --json (the monitor's g key filters by "
                     "agent; reports take --agent too)")
    return modes[0] if modes else "monitor"


def main(argv: list[str] | None = None, quick_routes: str | None = None) -> int:
    """Run a command; output that cannot be written (a full disk, a closed pipe) ends it with one line.
    ccmon.pyz's bootstrap gives `quick_routes`: the file where it looks for the quick routes (QuickRoute)."""
    try:
        code = run_command(sys.argv[1:] if argv is None else argv, quick_routes)
        sys.stdout.flush()  # what is still buffered fails here, not in a traceback at exit
        return code
    except BrokenPipeError:  # `ccmon report daily | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush into the pipe
        return 0
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO) or exc.filename is not None:
            raise  # a named file's failure (the server's database, say), not the output's
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the rest is lost either way
        print(f"ccmon: cannot write the output: {exc.strerror}", file=sys.stderr)
        return 1


def run_command(argv: list[str], quick_routes: str | None = None) -> int:
    mode, parser, words = "", build_parser(), argv
    for command, build in COMMAND_PARSERS.items():
        command_words = without_command(argv, command, parser)
        if command_words is not None:
            mode, parser, words = command, build(), command_words
            break
    args = parser.parse_args(words)
    mode = mode or chosen_mode(args, parser)
    if mode == "setup" and args.replace_status_line and args.agent != CLAUDE_CODE:
        parser.error(f"--replace-status-line is for Claude Code's status line (not with --agent {args.agent})")
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(message)s")
    if isinstance(args.server, str):  # '--server HOST:PORT' is the original spelling of --monitor-server
        args.monitor_server, args.server = args.server, None
    if mode == "statusline":  # Claude Code runs it in every project folder: never a config found there
        try:
            config = client_config(load_config(args, search_cwd=False))
            # never waited for (Claude Code waits for the line): this one is from stdin, the next from the server
            notice = start_local_server_if_needed(config, wait=False)
            if notice:
                print(f"ccmon: {notice}; this line is from Claude Code's input alone", file=sys.stderr)
        except (ConfigError, ServerError) as exc:  # still a line, from stdin alone: never blank
            print(f"ccmon: config error: {exc}" if isinstance(exc, ConfigError) else f"ccmon: {exc}", file=sys.stderr)
            config = None
        route = QuickRoute(Path(quick_routes), tuple(argv), tuple(config_file_candidates(args.config, False)),
                           route_folder(args.config, False)) if quick_routes else None
        return run_status_line(config, args.format, route=route)
    if mode == "doctor":  # a config error is one of the links it reports
        return run_doctor(args, dict(os.environ), Path.home())
    try:
        config = load_config(args)
        if mode == "server":
            return run_server_command(config, args.action)
        if mode == "--server":
            return serve(config)
        config = client_config(config)
        if mode == "--health":  # a health check looks, it starts nothing
            return run_health_check(config)
        if mode == "setup":  # it writes Claude Code's settings for this server, started or not
            return run_setup(config, args, dict(os.environ), Path.home())
        if mode == "report":  # a mistake in the flags is said before a server is started for it
            report_flags_period(args, config.zone)
        notice = start_local_server_if_needed(config)
        if notice and mode != "monitor":
            print(f"ccmon: {notice}", file=sys.stderr)
        if mode == "report":
            return run_report(config, args)
        if mode == "import":
            return run_import(config, args)
        if mode in ("--format", "--json"):  # --format in a status bar: a route to the server for the next one
            route = QuickRoute(Path(quick_routes), tuple(argv), tuple(config_file_candidates(args.config, True)),
                               route_folder(args.config, True)) if quick_routes else None
            return run_quick_query(config, args.format, args.json, args.agent, route)
        return run_monitor(config, notice)
    except ConfigError as exc:
        print(f"ccmon: config error: {exc}", file=sys.stderr)
        return 2
    except ServerError as exc:
        print(f"ccmon: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
