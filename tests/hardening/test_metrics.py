"""Self-observability: /metrics and /health on their own port, structured rate-limited logs.

Traffic of every kind goes through a real agent process (the tracing app, exporting to a
receiver in this process); the scrape is parsed with prometheus_client's own parser, so a
malformed exposition fails here as it would fail Prometheus.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator

import pytest

from spoe_agent.logs import JsonFormatter, RateLimitFilter, TextFormatter, Throttle, log_safe
from spoe_agent.protocol import codec
from spoe_agent.protocol.types import FrameType, Message
from spoe_agent.viewer.receiver import JaegerReceiver
from tests.hardening.support import (
    SLOW_APP,
    clean_env,
    disconnect_status,
    http_get,
    notify_ok,
    read_until_eof,
    scrape,
    trace,
    value,
    whole_session,
)
from tests.support.procs import AgentProcess, free_port, wait_until
from tests.support.spop_client import SpopClient

AgentFactory = Callable[..., AgentProcess]


@pytest.fixture
def receiver() -> Iterator[JaegerReceiver]:
    with JaegerReceiver(udp_addr=("127.0.0.1", 0), http_addr=None, quiet_s=0.5) as rec:
        yield rec


def tracing_env(receiver: JaegerReceiver) -> dict[str, str]:
    host, port = receiver.udp_address
    return clean_env(OTEL_EXPORTER_JAEGER_AGENT_HOST=str(host),
                     OTEL_EXPORTER_JAEGER_AGENT_PORT=str(port), OTEL_BSP_SCHEDULE_DELAY="50")


def test_metrics_endpoint_reports_every_family(
    spoe_agent: AgentFactory, receiver: JaegerReceiver
) -> None:
    metrics = free_port()
    agent = spoe_agent("--metrics", f"127.0.0.1:{metrics}", app=None, env=tracing_env(receiver))
    assert http_get(metrics, "/health") == (200, "ok\n")
    assert http_get(metrics, "/elsewhere")[0] == 404
    address = (agent.host, agent.port)

    with SpopClient(address) as check:  # a health check, as option spop-check does
        check.handshake(capabilities="", healthcheck=True)
    with SpopClient(address) as client:
        client.handshake()
        for i in range(3):
            first, last = whole_session(f"done-{i}")
            notify_ok(client, 4 * i + 1, [first])
            notify_ok(client, 4 * i + 3, [last])
        notify_ok(client, 99, [trace("still-open", ("span", "open"))])
        # HAProxy says goodbye with a non-zero status; the agent answers status 0.
        client.send(codec.disconnect(FrameType.HAPROXY_DISCONNECT, 8, "unsupported version"))
        assert disconnect_status(client.read_frame()) == 0
    with SpopClient(address) as broken:  # a protocol error: an unknown data type
        broken.handshake()
        broken.send(codec.encode_frame(FrameType.NOTIFY, 1, 1, b"\x01m\x01\x01a\x0e"))
        assert [disconnect_status(f) for f in read_until_eof(broken)] == [4]

    wait_until(lambda: value(scrape(metrics), "spoe_agent_spans_exported_total") == 6,
               what="the six finished spans to be exported")
    s = scrape(metrics)
    frames = "spoe_agent_frames_total"
    assert value(s, frames, direction="in", type="haproxy_hello") == 3
    assert value(s, frames, direction="out", type="agent_hello") == 3
    assert value(s, frames, direction="in", type="notify") == 7
    assert value(s, frames, direction="out", type="ack") == 7
    assert value(s, frames, direction="in", type="haproxy_disconnect") == 1
    assert value(s, frames, direction="out", type="agent_disconnect") == 2
    assert value(s, "spoe_agent_healthchecks_total") == 1
    disconnects = "spoe_agent_disconnects_total"
    assert value(s, disconnects, direction="received", status="8",
                 reason="unsupported_version") == 1
    assert value(s, disconnects, direction="sent", status="0", reason="normal") == 1
    assert value(s, disconnects, direction="sent", status="4", reason="invalid_frame") == 1
    assert value(s, "spoe_agent_connections_total") == 4
    assert value(s, "spoe_agent_connections_open") == 0
    # One observation per read of NOTIFYs, which were read one by one here; the HELLOs, the
    # health check and the DISCONNECT are no ACKs.
    count = value(s, "spoe_agent_ack_latency_seconds_count")
    assert count == 7
    assert value(s, "spoe_agent_ack_latency_seconds_bucket", le="+Inf") == count
    assert value(s, "spoe_agent_sessions_open") == 1
    assert value(s, "spoe_agent_spans_started_total") == 7
    assert value(s, "spoe_agent_spans_dropped_total", reason="queue_full") == 0
    assert value(s, "spoe_agent_spans_dropped_total", reason="export_failed") == 0
    assert value(s, "spoe_agent_exporter_errors_total") == 0
    assert value(s, "spoe_agent_export_queue_size") == 0
    assert value(s, "spoe_agent_export_queue_limit") == 20480
    limits = ("sessions", "spans_per_session", "items_per_span", "attribute_length", "export_queue")
    for limit in limits:
        assert value(s, "spoe_agent_limit_hits_total", limit=limit) == 0, limit
    assert value(s, "spoe_agent_handler_errors_total") == 0
    assert (value(s, "process_resident_memory_bytes") or 0) > 0


def test_an_ack_cut_to_the_frame_size_is_a_limit_hit(spoe_agent: AgentFactory) -> None:
    """HAProxy gets the leading actions that fit (the connection logs it); the scrape counts it."""
    metrics = free_port()
    agent = spoe_agent("--metrics", f"127.0.0.1:{metrics}", app=None, env=clean_env())
    with SpopClient((agent.host, agent.port)) as client:
        client.handshake(max_frame_size=256)
        notify_ok(client, 1, [trace("big", ("span", "root"), ("baggage", "k1"), ("", "v" * 150))])
        notify_ok(client, 1, [trace("big", ("baggage", "k2"), ("", "v" * 150))])
        frame = notify_ok(client, 1, [trace("big", ("inject", "root"))])
        names = [action.name for action in codec.decode_actions(frame.payload)]
        assert names == ["traceparent"]
    s = scrape(metrics)
    assert value(s, "spoe_agent_limit_hits_total", limit="ack_frame_size") == 1


def test_health_turns_503_while_draining_then_the_agent_exits(spoe_agent: AgentFactory) -> None:
    metrics = free_port()
    agent = spoe_agent("--metrics", f"127.0.0.1:{metrics}", app=SLOW_APP)
    with SpopClient((agent.host, agent.port), timeout=15) as client:
        client.handshake()
        client.send(codec.notify(1, 1, [Message("nap", [("ms", 1500), ("id", 1)])]))
        notify_ok(client, 3, [Message("inline", [("v", 1)])])  # the nap is now in flight
        agent.process.send_signal(signal.SIGTERM)
        wait_until(lambda: http_get(metrics, "/health")[0] == 503, timeout=10,
                   what="/health to report the shutdown")
        frames = read_until_eof(client)
        assert [f.type for f in frames] == [FrameType.ACK, FrameType.AGENT_DISCONNECT], frames
    assert agent.process.wait(15) == 0


def test_logs_are_json_lines_and_a_storm_is_one_line(spoe_agent: AgentFactory) -> None:
    metrics = free_port()
    agent = spoe_agent("--metrics", f"127.0.0.1:{metrics}", "--log-format", "json",
                       app=SLOW_APP)
    storm = 40
    for _ in range(storm):
        with SpopClient((agent.host, agent.port)) as client:
            client.handshake()
            client.send(b"\x00\x00\x00\x03\x03\x00\x00")  # a frame too short to be one
            assert [disconnect_status(f) for f in read_until_eof(client)] == [4]
    with SpopClient((agent.host, agent.port)) as client:  # another kind of error: reported
        client.handshake()
        client.send(b"\xff\xff\xff\xff")  # a frame over the negotiated size
        assert [disconnect_status(f) for f in read_until_eof(client)] == [3]
    s = scrape(metrics)
    assert value(s, "spoe_agent_disconnects_total", direction="sent", status="4",
                 reason="invalid_frame") == storm
    lines = [line for line in agent.process.stderr_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records), records
    # Counted 40 times, logged once in the interval: the agent's warning with the peer, and
    # at most one INFO line of the protocol layer's own.
    warnings = [r for r in records if "protocol error from" in r["msg"]]
    assert [w["msg"].split("status ")[1][0] for w in warnings] == ["4", "3"], warnings
    assert {w["level"] for w in warnings} == {"warning"}, warnings
    mentions = [r for r in records if "protocol error" in r["msg"]]
    assert len(mentions) <= 4, mentions


# ------------------------------------------------------------------------ logging pieces


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throttle_logs_once_per_interval_and_says_how_many_it_held(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    throttle = Throttle(logging.getLogger("t"), interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="t"):
        assert throttle.warning("limit", "limit hit by %s", "a")
        for peer in "bcd":
            assert not throttle.warning("limit", "limit hit by %s", peer)
        assert throttle.warning("other", "another limit")  # keys are independent
        clock.now += 10.0
        assert throttle.warning("limit", "limit hit by %s", "e")
    assert [r.getMessage() for r in caplog.records] == [
        "limit hit by a", "another limit",
        "limit hit by e (and 3 more like it since the last report)",
    ]
    # A configured, expected close (idle_timeout) is held and counted alike, at its own level.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="t"):
        assert throttle.log(logging.INFO, "idle", "idle close of %s", "a")
        assert not throttle.log(logging.INFO, "idle", "idle close of %s", "b")
        clock.now += 10.0
        assert throttle.log(logging.INFO, "idle", "idle close of %s", "c")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "idle close of a"),
        (logging.INFO, "idle close of c (and 1 more like it since the last report)"),
    ]


@contextlib.contextmanager
def _limited_messages(name: str) -> Iterator[list[str]]:
    """What logger ``name`` logs through a RateLimitFilter, as setup_logging installs one."""
    seen: list[str] = []
    sink = logging.Handler()
    sink.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    sink.addFilter(RateLimitFilter(interval=10.0))
    logger = logging.getLogger(name)
    logger.addHandler(sink)
    try:
        yield seen
    finally:
        logger.removeHandler(sink)


def test_a_throttled_line_is_not_held_back_again_by_the_rate_limit() -> None:
    """Code review: both limit to one line per 10 s, on clocks read a moment apart, so the
    filter could hold back the line the throttle let out at the interval's edge, and with it
    the count of the lines the throttle had held."""
    clock = _Clock()
    with _limited_messages("throttled-twice") as seen:
        throttle = Throttle(logging.getLogger("throttled-twice"), interval=10.0, clock=clock)
        assert throttle.warning("slow", "limit hit")
        for held in (1, 2):
            for _ in range(held):
                assert not throttle.warning("slow", "limit hit")
            clock.now += 10.0  # the throttle's interval is up; the filter's clock hardly moved
            assert throttle.warning("slow", "limit hit")
    assert seen == ["limit hit", "limit hit (and 1 more like it since the last report)",
                    "limit hit (and 2 more like it since the last report)"]


def test_rate_limit_filter_covers_info_but_not_debug() -> None:
    limit = RateLimitFilter(interval=10.0)

    def record(level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord("x", level, __file__, 1, msg, ("peer",), None)

    assert limit.filter(record(logging.INFO, "closing %s"))
    assert not limit.filter(record(logging.INFO, "closing %s"))
    assert limit.filter(record(logging.DEBUG, "detail %s"))
    assert limit.filter(record(logging.DEBUG, "detail %s"))


def test_held_back_lines_are_counted_at_exit(capsys: pytest.CaptureFixture[str]) -> None:
    """Black-box run: a storm's last ten seconds of held-back lines were never said, because
    only a later line of the same kind reports them and at a stop none comes."""
    from spoe_agent.logs import flush_held_lines, setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("INFO")
        noisy = logging.getLogger("spoe_agent.server")
        for peer in ("a", "b", "c"):
            noisy.warning("protocol error from %s", peer)
        logging.getLogger("spoe_agent.other").info("quiet %s", "once")
        flush_held_lines()
        flush_held_lines()  # said once: the counts start again
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "WARNING spoe_agent.server: protocol error from a",
        "INFO spoe_agent.other: quiet once",
        "WARNING spoe_agent.server: 2 more lines like this one held back since it was last "
        "logged: protocol error from %s",
    ]


def test_lines_marked_every_time_are_never_held_back() -> None:
    from spoe_agent.logs import EVERY_TIME

    limit = RateLimitFilter(interval=10.0)
    for _ in range(3):
        record = logging.LogRecord("x", logging.WARNING, __file__, 1, "worker %d died", (0,), None)
        record.__dict__.update(EVERY_TIME)
        assert limit.filter(record)
    plain = logging.LogRecord("x", logging.WARNING, __file__, 1, "worker %d died", (0,), None)
    assert limit.filter(plain)
    assert not limit.filter(logging.LogRecord("x", logging.WARNING, __file__, 1, "worker %d died",
                                              (0,), None))


def test_one_failing_handler_does_not_hide_another_ones_error() -> None:
    """The failures share a template, which the rate limit keys on: the message name keys it
    too, so each failing handler is logged (once per interval, like anything else)."""
    from spoe_agent.handlers import Agent

    agent = Agent("two-failures")

    @agent.message("boom")
    def boom(args: list[tuple[str, object]]) -> None:
        raise RuntimeError("boom")

    @agent.message("single")
    def single(args: list[tuple[str, object]]) -> object:
        return 42  # not a list of actions: fails in the agent, not in the handler

    with _limited_messages("spoe_agent.handlers") as seen:
        for _ in range(3):
            agent.dispatch([Message("boom", []), Message("single", [])])
    assert seen == ["handler for SPOE message 'boom' failed",
                    "handler for SPOE message 'single' failed"]
    assert agent.handler_errors == 6


def test_log_lines_cannot_be_forged_by_peer_data() -> None:
    assert log_safe("bye\nCRITICAL forged\r\x1b[31m") == "bye\\x0aCRITICAL forged\\x0d\\x1b[31m"
    assert log_safe("lone \udcff surrogate") == "lone \\udcff surrogate"
    assert log_safe("tab\tand é stay") == "tab\tand é stay"
    formatter = TextFormatter("%(levelname)s %(message)s")
    line = formatter.format(logging.LogRecord("x", logging.WARNING, __file__, 1,
                                              "HAProxy said %s", ("a\nERROR b",), None))
    assert "\n" not in line and line == "WARNING HAProxy said a\\x0aERROR b"
    entry = json.loads(JsonFormatter().format(logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "said %s", ("\udcff\n",), None)))
    assert entry["msg"] == "said \\udcff\\x0a"
    # Code review: NEL (a line end to str.splitlines) and CSI (a terminal escape) passed, and
    # a traceback's lines went out flush left and unescaped.
    assert log_safe("bye\x85FORGED\x9b31m") == "bye\\x85FORGED\\x9b31m"
    try:
        raise ValueError("unknown method x\n2026-12-03 CRITICAL spoe_agent.runner: forged")
    except ValueError:
        exc_info = sys.exc_info()
    text = formatter.format(logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (),
                                              exc_info))
    assert [line for line in text.splitlines()[1:] if not line.startswith("  ")] == []


def test_each_failing_metrics_source_is_named_in_the_log(caplog) -> None:  # type: ignore[no-untyped-def]
    """Code review: two failing sources shared one line's rate limit, so the second's error
    was never seen at any usual scrape interval."""
    import logging as _logging

    from spoe_agent.config import AgentConfig
    from spoe_agent.handlers import Agent
    from spoe_agent.metrics import AgentCollector
    from spoe_agent.server import SpoaServer

    agent = Agent("sources")

    def source_a():  # type: ignore[no-untyped-def]
        raise RuntimeError("a broke")

    def source_b():  # type: ignore[no-untyped-def]
        raise RuntimeError("b broke")

    agent.metric_sources += [source_a, source_b]
    collector = AgentCollector(SpoaServer(agent, AgentConfig(exporter="none")), agent)
    with caplog.at_level(_logging.ERROR, logger="spoe_agent.metrics"):
        list(collector.collect())
    lines = [r.getMessage() for r in caplog.records]
    assert any("source_a failed" in line for line in lines), lines
    assert any("source_b failed" in line for line in lines), lines
    keys = {getattr(r, "rate_key", None) for r in caplog.records}
    assert len(keys) == 2


def test_what_the_throttle_holds_back_is_said_at_a_stop(caplog: pytest.LogCaptureFixture) -> None:
    """Black-box run: two closes counted into "(and N more ...)" were never logged, since no
    later line of their kind came before SIGTERM."""
    clock = [0.0]
    throttle = Throttle(logging.getLogger("held"), interval=10.0, clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="held"):
        throttle.warning("write_timeout", "closed %s", "a")
        throttle.warning("write_timeout", "closed %s", "b")
        throttle.warning("write_timeout", "closed %s", "c")
        throttle.flush()
        throttle.flush()  # once
    assert [r.getMessage() for r in caplog.records] == [
        "closed a", "2 more write_timeout events since the last line about them, held back"]
