"""Every configured limit, hit on purpose: the agent counts it, logs it once, and keeps serving.

The agent is the real CLI with an agent.ini; what each test asserts is what HAProxy (here a raw
SPOP client playing it) sees on the wire, what /metrics reports and what the log says.
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from spoe_agent.protocol import codec
from spoe_agent.protocol.types import Frame, FrameType, Message
from spoe_agent.viewer.receiver import JaegerReceiver
from tests.hardening.support import (
    SLOW_APP,
    clean_env,
    disconnect_status,
    notify_ok,
    read_until_eof,
    scrape,
    total,
    trace,
    value,
    write_ini,
)
from tests.integration.backend import Backend
from tests.integration.test_haproxy_core import haproxy_config, spoe_config
from tests.support.haproxy import HAProxy
from tests.support.procs import AgentProcess, free_port, wait_until
from tests.support.spop_client import SpopClient, hello_frame

AgentFactory = Callable[..., AgentProcess]


def start(spoe_agent: AgentFactory, tmp_path: Path, listener: str, *, app: str | None = SLOW_APP,
          tracing: str = "", env: dict[str, str] | None = None) -> tuple[AgentProcess, int]:
    """An agent with these [listener] (and [tracing]) lines and a metrics port."""
    ini = write_ini(tmp_path, f"[listener]\n{listener}\n[tracing]\n{tracing}\n")
    metrics = free_port()
    agent = spoe_agent("-c", ini, "--metrics", f"127.0.0.1:{metrics}", app=app, env=env)
    return agent, metrics


def limit_hits(metrics: int, limit: str) -> float:
    return value(scrape(metrics), "spoe_agent_limit_hits_total", limit=limit) or 0.0


def still_serving(agent: AgentProcess) -> None:
    assert agent.process.running, agent.describe_logs()
    with SpopClient((agent.host, agent.port), timeout=10) as client:
        assert client.handshake()["version"] == "2.0"


# ------------------------------------------------------------------------- connections


def test_connection_cap_makes_new_connections_wait_not_fail(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    agent, metrics = start(spoe_agent, tmp_path, "max_connections = 2")
    address = (agent.host, agent.port)
    first, second = SpopClient(address), SpopClient(address)
    first.handshake()
    second.handshake()
    waiting = SpopClient(address, timeout=1.5)  # the kernel completes the TCP handshake
    waiting.send(hello_frame())
    with pytest.raises(TimeoutError):  # but nobody reads its HELLO while the cap is reached
        waiting.read_frame()
    another = SpopClient(address, timeout=1.5)
    another.send(hello_frame())
    wait_until(lambda: limit_hits(metrics, "connections") >= 1, what="the connections limit hit")

    first.close()  # a slot frees: the waiting connection is served, in order
    waiting.sock.settimeout(10)
    frame = waiting.read_frame()
    assert frame is not None and frame.type == FrameType.AGENT_HELLO, frame
    second.close()
    another.sock.settimeout(10)
    frame = another.read_frame()
    assert frame is not None and frame.type == FrameType.AGENT_HELLO, frame
    waiting.close()
    another.close()

    assert limit_hits(metrics, "connections") >= 2
    logged = re.findall(r"max_connections \(2\) reached", agent.logs())
    assert len(logged) == 1, agent.logs()  # counted every time, logged once per interval
    still_serving(agent)


def test_a_waiting_connection_takes_the_slot_of_one_that_never_said_hello(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    """Silent peers filling max_connections must not keep HAProxy out for a HELLO deadline
    (read_timeout): the oldest gives its slot to the connection that waits, and only it."""
    agent, metrics = start(spoe_agent, tmp_path, "max_connections = 2\nread_timeout = 60s")
    address = (agent.host, agent.port)
    oldest, younger = SpopClient(address, timeout=15), SpopClient(address, timeout=15)
    wait_until(lambda: value(scrape(metrics), "spoe_agent_connections_open") == 2,
               what="both silent connections accepted")
    with SpopClient(address, timeout=15) as haproxy:  # well under read_timeout
        haproxy.send(hello_frame())
        frame = haproxy.read_frame()
        assert frame is not None and frame.type == FrameType.AGENT_HELLO, frame
    assert [disconnect_status(f) for f in read_until_eof(oldest)] == [2]
    younger.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):  # one slot was wanted: one connection gave it
        younger.read_frame()
    younger.close()
    oldest.close()
    assert limit_hits(metrics, "hello_evicted") == 1
    assert re.search(r"with status 2: no HELLO \d+\.\ds after connecting", agent.logs())
    still_serving(agent)


def test_a_connection_that_said_hello_keeps_its_slot(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    """... for as long as it is in use, or idle for less than IDLE_GRACE_S (5 s)."""
    agent, metrics = start(spoe_agent, tmp_path, "max_connections = 1\nread_timeout = 60s")
    address = (agent.host, agent.port)
    with SpopClient(address, timeout=15) as served:
        served.handshake()
        waiting = SpopClient(address, timeout=3)  # past HELLO_GRACE_S
        waiting.send(hello_frame())
        with pytest.raises(TimeoutError):
            waiting.read_frame()
        assert limit_hits(metrics, "connections") >= 1
        notify_ok(served, 1, [trace("kept", ("span", "x"))])  # still served
    waiting.sock.settimeout(15)  # served once the slot frees
    frame = waiting.read_frame()
    assert frame is not None and frame.type == FrameType.AGENT_HELLO, frame
    waiting.close()
    assert limit_hits(metrics, "hello_evicted") == 0


def test_at_the_cap_the_connection_idle_longest_gives_its_slot_not_one_in_use(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    """HAProxy 2.6 opens a connection per stream queued in a burst and keeps each for its
    ``timeout idle`` (2m): 12,000 in a second filled max_connections, the health check waited
    in the backlog and the agent was DOWN for two minutes (black-box run). A waiting
    connection now takes the slot of the one idle longest, once idle IDLE_GRACE_S (5 s),
    closed with status 2 as HAProxy's own timeout idle closes it; not a connection in use,
    even an older one."""
    agent, metrics = start(spoe_agent, tmp_path, "max_connections = 2\nread_timeout = 60s",
                           app=None)
    address = (agent.host, agent.port)
    with SpopClient(address, timeout=15) as used, SpopClient(address, timeout=15) as idle:
        used.handshake()
        idle.handshake()
        waiting = SpopClient(address, timeout=15)
        waiting.send(hello_frame())
        stream = 0
        # In use: a NOTIFY every half second, until the waiting connection is answered.
        waiting.sock.settimeout(0.5)
        answered = None
        for _ in range(40):
            stream += 1
            notify_ok(used, stream, [trace("busy", ("span", "x"))])
            try:
                answered = waiting.read_frame()
                break
            except TimeoutError:
                continue
        assert answered is not None and answered.type == FrameType.AGENT_HELLO, answered
        assert [disconnect_status(f) for f in read_until_eof(idle)] == [2]
        notify_ok(used, stream + 1, [trace("busy", ("span", "x"))])  # kept its slot
        waiting.close()
    assert limit_hits(metrics, "idle_evicted") == 1
    assert limit_hits(metrics, "hello_evicted") == 0
    assert re.search(r"with status 2: nothing received for [5-9]\.\ds, and a new connection "
                     r"needs its slot", agent.logs()), agent.describe_logs()
    still_serving(agent)


def test_a_cap_reached_while_every_connection_is_busy_still_evicts_once_one_is_idle(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    """When the connection came, the only slot was busy (a handler in flight): nothing was
    idle to evict, and nothing looked again, so it waited for HAProxy's timeout idle (re-test
    run: DOWN for 115 s in 5 of 9 runs). One process now looks again every second."""
    agent, metrics = start(spoe_agent, tmp_path, "max_connections = 1\nread_timeout = 60s")
    address = (agent.host, agent.port)
    with SpopClient(address, timeout=15) as busy:
        busy.handshake()
        busy.send(codec.notify(1, 1, [Message("nap", [("ms", 1500), ("id", 1)])]))
        waiting = SpopClient(address, timeout=20)  # arrives while the handler is in flight
        waiting.send(hello_frame())
        ack = busy.read_frame()
        assert ack is not None and ack.type == FrameType.ACK, ack
        frame = waiting.read_frame()  # the busy one, idle 5 s since its ACK, gives its slot
        assert frame is not None and frame.type == FrameType.AGENT_HELLO, frame
        waiting.close()
    assert limit_hits(metrics, "idle_evicted") == 1
    still_serving(agent)


# ---------------------------------------------------------------------------- deadlines


def test_silent_connection_must_say_hello_within_read_timeout(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    agent, metrics = start(spoe_agent, tmp_path, "read_timeout = 1s\nidle_timeout = 0")
    with SpopClient((agent.host, agent.port), timeout=15) as client:
        frames = read_until_eof(client)  # sends nothing at all
    assert [disconnect_status(f) for f in frames] == [2], frames
    assert limit_hits(metrics, "hello_timeout") == 1
    # A peer that never says HELLO is a problem, unlike a configured idle close.
    assert re.search(r"WARNING spoe_agent\.server: closing \S+ with status 2: no complete HELLO "
                     r"within read_timeout \(1\.0s\)", agent.logs()), agent.describe_logs()
    still_serving(agent)


def dribble(client: SpopClient, data: bytes, pause: float = 0.25) -> tuple[int, Frame | None]:
    """Send ``data`` one byte per ``pause`` until the agent answers: (bytes sent, its frame)."""
    client.sock.settimeout(pause)
    for sent in range(1, len(data) + 1):
        client.send(data[sent - 1:sent])
        try:
            return sent, client.read_frame()
        except TimeoutError:
            continue
    return len(data), None


def test_dribbled_hello_hits_the_deadline_despite_activity(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    """A slowloris keeps the connection busy; the deadline is per HELLO, not per byte."""
    agent, metrics = start(spoe_agent, tmp_path, "read_timeout = 1s\nidle_timeout = 0")
    hello = hello_frame()
    with SpopClient((agent.host, agent.port)) as client:
        sent, frame = dribble(client, hello)
        assert sent < len(hello), "the whole HELLO went through: no deadline"
        assert disconnect_status(frame) == 2
    assert limit_hits(metrics, "hello_timeout") == 1
    still_serving(agent)


def test_skipped_frames_before_hello_do_not_move_its_deadline(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    """Unknown frames are skipped, but each one a peer completes must not restart the clock:
    rest of one frame + first byte of the next, forever, held a slot without a HELLO."""
    agent, metrics = start(spoe_agent, tmp_path, "read_timeout = 1s\nidle_timeout = 0")
    unknown = codec.encode_frame(42, 1, 1, b"xxxx")  # a type the spec says to skip
    with SpopClient((agent.host, agent.port), timeout=15) as client:
        client.send(unknown[:1])
        client.sock.settimeout(0.25)
        frame = None
        for _ in range(16):  # 4 s of it, against a 1 s deadline
            client.send(unknown[1:] + unknown[:1])
            try:
                frame = client.read_frame()
                break
            except TimeoutError:
                continue
        assert disconnect_status(frame) == 2
    assert limit_hits(metrics, "hello_timeout") == 1
    still_serving(agent)


def test_a_fragmented_notify_left_half_done_hits_the_read_deadline(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    """Between two fragments nothing is buffered, but the NOTIFY is not done: its next fragment
    is due within read_timeout, as the rest of a frame is. Under the idle timeout (600 s by
    default; off here) the reassembled part (up to 1 MiB) was held all that time."""
    agent, metrics = start(spoe_agent, tmp_path, "read_timeout = 1s\nidle_timeout = 0")
    payload = codec.notify(1, 1, [Message("inline", [("pad", "x" * 200)])])[4 + 1 + 4 + 2:]
    first = codec.encode_frame(FrameType.NOTIFY, 1, 1, payload[:100], 0)  # FIN unset
    with SpopClient((agent.host, agent.port), timeout=15) as client:
        client.handshake(capabilities="pipelining,async,fragmentation")
        client.send(first)
        assert [disconnect_status(f) for f in read_until_eof(client)] == [2]
    assert limit_hits(metrics, "read_timeout") == 1
    still_serving(agent)


def test_frame_that_never_completes_hits_the_read_deadline(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    agent, metrics = start(spoe_agent, tmp_path, "read_timeout = 1s\nidle_timeout = 0")
    notify = codec.notify(1, 1, [Message("inline", [("pad", "x" * 200)])])
    with SpopClient((agent.host, agent.port)) as client:
        client.handshake()
        # Complete frames keep the connection healthy, however slowly they come...
        notify_ok(client, 3, [Message("inline", [("v", 1)])])
        sent, answered = dribble(client, notify)
        # ... but a frame must complete within read_timeout of its first byte.
        assert sent < len(notify), "the whole frame went through: no deadline"
        assert disconnect_status(answered) == 2
    assert limit_hits(metrics, "read_timeout") == 1
    still_serving(agent)


def test_idle_connection_is_closed_like_haproxy_does_but_not_while_busy(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    agent, metrics = start(spoe_agent, tmp_path, "idle_timeout = 1s")
    with SpopClient((agent.host, agent.port), timeout=15) as client:
        client.handshake()
        # A handler in flight longer than the idle timeout: HAProxy awaits its ACK, so the
        # connection is not idle and must not be closed under it.
        ack = notify_ok(client, 1, [Message("nap", [("ms", 2500), ("id", 7)])])
        assert ack.stream_id == 1
        frames = read_until_eof(client)  # then nothing more: idle
    assert [disconnect_status(f) for f in frames] == [2], frames
    assert limit_hits(metrics, "idle_timeout") == 1
    # The configured idle close is normal operation, as HAProxy's "timeout idle" is: INFO.
    assert re.search(r"INFO spoe_agent\.server: closing \S+ with status 2: nothing received for "
                     r"idle_timeout \(1\.0s\)", agent.logs()), agent.describe_logs()
    assert "WARNING spoe_agent.server: closing" not in agent.logs()
    samples = scrape(metrics)
    assert value(samples, "spoe_agent_disconnects_total", direction="sent", status="2",
                 reason="timeout") == 1
    still_serving(agent)


# ----------------------------------------------------------------------------- in flight


def test_in_flight_cap_is_back_pressure_every_notify_still_acked(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    agent, metrics = start(spoe_agent, tmp_path, "max_in_flight = 2")
    with SpopClient((agent.host, agent.port), timeout=15) as client:
        client.handshake()
        count = 8
        client.send(b"".join(
            codec.notify(2 * i + 1, 1, [Message("nap", [("ms", 100), ("id", i)])])
            for i in range(count)
        ))
        acked = set()
        for _ in range(count):
            frame = client.read_frame()
            assert frame is not None and frame.type == FrameType.ACK, frame
            acked.add(frame.stream_id)
        assert acked == {2 * i + 1 for i in range(count)}
    assert limit_hits(metrics, "in_flight") >= 1
    assert len(re.findall(r"max_in_flight \(2\)", agent.logs())) == 1, agent.logs()
    still_serving(agent)


# ------------------------------------------------------------------------------ tracing


def test_tracing_limits_are_counted_logged_and_applied(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    with JaegerReceiver(udp_addr=("127.0.0.1", 0), http_addr=None, quiet_s=0.5) as receiver:
        host, port = receiver.udp_address
        env = clean_env(OTEL_EXPORTER_JAEGER_AGENT_HOST=str(host),
                        OTEL_EXPORTER_JAEGER_AGENT_PORT=str(port), OTEL_BSP_SCHEDULE_DELAY="50")
        agent, metrics = start(
            spoe_agent, tmp_path, "", app=None, env=env,
            tracing="max_sessions = 3\nmax_spans_per_session = 2\nmax_attribute_length = 16",
        )
        with SpopClient((agent.host, agent.port), timeout=15) as client:
            client.handshake()
            # Five sessions open at once with a cap of three: the two oldest are ended early.
            for i in range(5):
                notify_ok(client, 2 * i + 1, [trace(f"s{i}", ("span", f"open-{i}"))])
            # Three spans asked of one session with a cap of two; and an oversized tag value.
            notify_ok(client, 21, [trace(
                "s9", ("span", "a"), ("tag", "long"), ("", "y" * 100),
                ("span", "b"), ("span", "c"), ("finish", "*"),
            )])
        received = receiver.wait_for(
            lambda spans: {"open-0", "open-1", "a", "b"} <= {s.operation_name for s in spans})
        assert received, [s.operation_name for s in receiver.spans]
        by_name = {s.operation_name: s for s in receiver.spans}
        assert "c" not in by_name
        for evicted in ("open-0", "open-1"):
            assert by_name[evicted].tags.get("haproxy.span.incomplete") is True
        assert by_name["a"].tags["long"] == "y" * 16

        samples = scrape(metrics)
        assert value(samples, "spoe_agent_limit_hits_total", limit="sessions") == 3
        assert value(samples, "spoe_agent_limit_hits_total", limit="spans_per_session") == 1
        assert value(samples, "spoe_agent_sessions_open") == 2  # s3, s4 (s9 finished)
        wait_until(lambda: "tracing limit sessions hit" in agent.logs(), what="limit log line")
        wait_until(lambda: "tracing limit spans_per_session hit" in agent.logs(),
                   what="limit log line")
        still_serving(agent)


def test_messages_without_a_session_key_are_logged_not_only_counted(
    spoe_agent: AgentFactory,
) -> None:
    """A frontend without unique-id-format sends id= as NULL: every message is ignored, and a
    new user with no /metrics must not be left with no traces and no word about why."""
    agent = spoe_agent(app=None, env=clean_env(OTEL_TRACES_EXPORTER="none"))
    with SpopClient((agent.host, agent.port)) as client:
        client.handshake()
        for stream in range(3):
            notify_ok(client, stream, [Message("trace", [("id", None), ("span", "root")])])
    wait_until(lambda: "3 SPOE messages with span arguments but no id= value ignored"
               in agent.logs(), what="the missing-id report")
    assert "is unique-id-format set" in agent.logs()
    still_serving(agent)


def test_typos_in_the_span_language_are_logged_and_every_event_has_a_series(
    spoe_agent: AgentFactory,
) -> None:
    """chlid-of= silently changed the trace's shape: it was counted, never said, and its
    counter did not exist before the first one (a dashboard or alert had nothing to read)."""
    metrics = free_port()
    agent = spoe_agent("--metrics", f"127.0.0.1:{metrics}", app=None,
                       env=clean_env(OTEL_TRACES_EXPORTER="none"))
    before = scrape(metrics)
    for event in ("unknown_arg", "bad_kind", "missing_id", "stray_value"):
        assert value(before, "spoe_agent_language_events_total", event=event) == 0, event
    with SpopClient((agent.host, agent.port)) as client:
        client.handshake()
        notify_ok(client, 1, [trace("typo", ("span", "root"), ("chlid-of", "nothing"),
                                    ("kind", "sever"))])
    wait_until(lambda: "1 SPOE message arguments with a name the span language does not know"
               in agent.logs(), what="the unknown-argument report")
    # Named, so that the typo is found without bisecting spoe.cfg (black-box run).
    assert "names first met since the last report: 'chlid-of')" in agent.logs()
    wait_until(lambda: "1 kind= values other than server" in agent.logs(),
               what="the bad-kind report")
    # inject= naming a span the session does not have: the next hop got no context, and a
    # counter was all that said so (black-box run: a typo, "Backend HTTP Request").
    with SpopClient((agent.host, agent.port)) as client:
        client.handshake()
        notify_ok(client, 2, [trace("typo", ("span", "Backend HTTP request"),
                                    ("inject", "Backend HTTP Request"))])
    wait_until(lambda: "1 inject= arguments named a span their session does not have since "
               "the last report (last: 'Backend HTTP Request')" in agent.logs(),
               what="the unknown-inject report")
    after = scrape(metrics)
    assert value(after, "spoe_agent_language_events_total", event="unknown_arg") == 1
    assert value(after, "spoe_agent_language_events_total", event="bad_kind") == 1
    still_serving(agent)


def test_events_after_the_session_ttl_are_logged_not_only_counted(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    """A server slower than session_ttl: the TTL ends the trace early, and the response's
    events that come later were dropped with nothing said but a counter (black-box run: a
    200 after 9.5 s showed as an incomplete 1 ms trace, and the log was silent)."""
    agent, metrics = start(spoe_agent, tmp_path, "", app=None, tracing="session_ttl = 1s",
                           env=clean_env(OTEL_TRACES_EXPORTER="none"))
    with SpopClient((agent.host, agent.port), timeout=15) as client:
        client.handshake()
        notify_ok(client, 1, [trace("slow", ("span", "root"))])
        wait_until(lambda: value(scrape(metrics), "spoe_agent_tracing_events_total",
                                 event="sessions_evicted_ttl") == 1, what="the TTL's end")
        notify_ok(client, 2, [trace("slow", ("finish", "root"))])
    wait_until(lambda: "1 SPOE messages came for sessions already ended by session_ttl"
               in agent.logs(), what="the late-message report")
    assert "Keep it above your longest 'timeout server'" in agent.logs()
    assert value(scrape(metrics), "spoe_agent_tracing_events_total", event="late_message") == 1
    still_serving(agent)
    # Two more within the report's 10 s, then a stop: said at the stop, or never.
    with SpopClient((agent.host, agent.port), timeout=15) as client:
        client.handshake()
        notify_ok(client, 1, [trace("slow", ("finish", "root"))])
        notify_ok(client, 2, [trace("slow", ("finish", "root"))])
    wait_until(lambda: value(scrape(metrics), "spoe_agent_tracing_events_total",
                             event="late_message") == 3, what="the later late messages")
    agent.stop()
    assert "2 SPOE messages came for sessions already ended" in agent.logs(), agent.logs()


def test_colliding_session_keys_and_streams_split_over_agents_are_logged(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    """Two HAProxies sending the same session key (a request id reused as unique-id on both
    hops), and one stream's events spread over two agents (a spoe-agents backend with two
    servers): every trace broken, and only counters said so (black-box run)."""
    agent, metrics = start(spoe_agent, tmp_path, "", app=None,
                           env=clean_env(OTEL_TRACES_EXPORTER="none"))
    with SpopClient((agent.host, agent.port), timeout=15) as client:
        client.handshake()
        notify_ok(client, 1, [trace("req-1", ("service", "hop1"), ("span", "HAProxy session"))])
        notify_ok(client, 2, [trace("req-1", ("service", "hop2"), ("span", "HAProxy session"))])
        # The rest of a stream whose start went to another agent: it names spans it never had.
        notify_ok(client, 3, [trace("req-2", ("span", "Backend TCP request"),
                                    ("follows-from", "Frontend HTTP request"),
                                    ("finish", "Frontend HTTP request"))])
    wait_until(lambda: "1 messages named another service than their session's since the last "
               "report (last: 'hop1', then 'hop2')" in agent.logs(), what="the conflict report")
    assert "each hop's unique-id must be its own" in agent.logs()
    wait_until(lambda: "1 sessions began mid-stream since the last report" in agent.logs(),
               what="the partial-session report")
    assert "mark the others 'backup'" in agent.logs()
    # Or HAProxy dropped the session's first messages (frames too small, black-box run).
    assert "3 or 259 is a message larger than the negotiated frame size" in agent.logs()
    samples = scrape(metrics)
    assert value(samples, "spoe_agent_tracing_events_total", event="service_conflict") == 1
    assert value(samples, "spoe_agent_tracing_events_total", event="sessions_partial") == 1
    still_serving(agent)


def test_open_sessions_hold_no_more_than_max_open_bytes(
    spoe_agent: AgentFactory, tmp_path: Path
) -> None:
    """A peer opening sessions of 15 tags of 4,000 characters took the agent from 81 MB to
    1 GB of RSS in 4 s (black-box run): no bound held the bytes. With max_open_bytes the
    values past it are dropped, counted and logged, and the agent goes on serving."""
    agent, metrics = start(spoe_agent, tmp_path, "", app=None, tracing="max_open_bytes = 1m",
                           env=clean_env(OTEL_TRACES_EXPORTER="none"))
    big = "x" * 4000
    with SpopClient((agent.host, agent.port), timeout=15) as client:
        client.handshake()
        stream = 0
        for session in range(30):  # 1.4 MB of values asked for, 1 MiB allowed
            for part in range(4):  # three tags a NOTIFY: under the 16,380-byte frames
                tags = [arg for i in range(3) for arg in (("tag", f"t{part}{i}"), ("", big))]
                stream += 1
                notify_ok(client, stream, [trace(f"s{session}", ("span", "root"), *tags)])
    assert limit_hits(metrics, "open_bytes") > 0
    wait_until(lambda: "tracing limit open_bytes hit" in agent.logs(),
               what="the open_bytes report")
    assert "max_open_bytes reached" in agent.logs()
    still_serving(agent)


# ------------------------------------------------------------------------- with HAProxy


@pytest.mark.haproxy
def test_haproxy_takes_the_agents_idle_close_in_its_stride(
    haproxy: Callable[..., HAProxy], spoe_agent: AgentFactory, backend: Backend,
    tmp_path: Path,
) -> None:
    """The agent's idle_timeout closes HAProxy's connection with status 2, as HAProxy's own
    ``timeout idle`` does; the next request simply gets a new connection, without an error."""
    agent, metrics = start(spoe_agent, tmp_path, "idle_timeout = 1s",
                           app="tests.apps.echo:agent")
    port = free_port()
    hap = haproxy(haproxy_config(port, backend, agent), spoe_config())
    hap.wait_server_status("agents", "a1", "UP", timeout=15)

    def check(path: str) -> dict[str, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            return {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()

    headers = check("/check/first")
    assert headers.get("x-v-echo_path") == "/check/first" and "x-v-err" not in headers
    wait_until(lambda: limit_hits(metrics, "idle_timeout") >= 1, what="the idle close")
    wait_until(lambda: total(scrape(metrics), "spoe_agent_connections_open") == 0,
               what="HAProxy's connection to close")
    headers = check("/check/second")
    assert headers.get("x-v-echo_path") == "/check/second" and "x-v-err" not in headers, headers
    assert hap.server_stats("agents", "a1")["status"] == "UP"
