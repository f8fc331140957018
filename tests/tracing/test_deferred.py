"""Work after the ACK: what the tracing agent defers, and the server's order of write and work.

HAProxy sends a stream's next event once it has read the ACK of the previous one, possibly on
another connection. So the work deferred past an ACK must be done before the connection greenlet
can yield, and before any later event of the same batch is applied.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import gevent
import gevent.socket
from hypothesis import given, settings
from hypothesis import strategies as st

from spoe_agent.config import AgentConfig
from spoe_agent.handlers import Agent
from spoe_agent.protocol import codec
from spoe_agent.protocol.connection import SpopConnection
from spoe_agent.protocol.types import FrameType, Message, Scope, SetVar
from spoe_agent.server import _Client
from spoe_agent.tracing.agent import TracingAgent
from tests.support.examples import examples
from tests.support.spop_client import SpopClient

KEY = "0a1b2c3d-0000-4000-8000-000000000001"


def _msg(name: str, *args: tuple[str, Any]) -> Message:
    return Message(name, [("id", KEY), ("ts", 1_700_000_000_000_000), *args])


def _agent() -> TracingAgent:
    return TracingAgent(AgentConfig(exporter="none"))


def test_only_a_message_that_injects_is_applied_before_its_ack() -> None:
    agent = _agent()
    now, later = agent.prepare([_msg("start", ("span", "a")), _msg("tag", ("span", "a"))])
    assert now is None and later is not None
    assert KEY not in agent.registry  # nothing applied yet
    assert later() is None
    assert KEY in agent.registry

    now, later = agent.prepare([_msg("inject", ("inject", "a"))])
    assert later is None and now is not None
    actions = now()
    assert [a.name for a in actions] == ["traceparent"]
    assert all(isinstance(a, SetVar) and a.scope is Scope.TXN for a in actions)

    # Messages asking nothing of a session are neither now nor later.
    assert agent.prepare([Message("other", [("x", 1)])]) == (None, None)


def test_a_failing_message_costs_itself_only(monkeypatch) -> None:
    agent = _agent()

    class BrokenRegistry:
        # A stand-in: a SessionRegistry compiled with mypyc has no patchable methods.
        def apply(self, command: Any) -> list[Any]:
            raise RuntimeError("registry bug")

    monkeypatch.setattr(agent, "registry", BrokenRegistry())
    now, later = agent.prepare([_msg("start", ("span", "a"))])
    assert now is None and later is not None
    assert later() is None
    assert agent.handler_errors == 1


class _Router:
    """The workers' mesh as the tracing agent sees it: this worker owns sessions in ``own``."""

    drains_per_read = True

    def __init__(self, agent: TracingAgent, own: set[str]) -> None:
        self.agent = agent
        self.own = own
        self.forwarded: list[Any] = []
        self.routed: list[Any] = []

    def keep_own(self, commands: list[Any]) -> list[Any]:
        self.forwarded += [c for c in commands if c.key not in self.own]
        return [c for c in commands if c.key in self.own]

    def route(self, command: Any) -> list[Any]:
        self.routed.append(command)
        return self.agent.registry.apply(command) if command.key in self.own else []


def test_with_workers_only_the_own_share_of_a_notify_waits_for_its_ack() -> None:
    """Forwarding happens before the ACK (``now``-time: in prepare), applying what this worker
    owns after it; a NOTIFY that injects routes everything before its ACK."""
    agent = _agent()
    other = "0a1b2c3d-0000-4000-8000-000000000002"
    router = agent.router = _Router(agent, {KEY})
    theirs = Message("start", [("id", other), ("ts", 1_700_000_000_000_000), ("span", "a")])
    now, later = agent.prepare([theirs])
    assert (now, later) == (None, None) and [c.key for c in router.forwarded] == [other]
    now, later = agent.prepare([_msg("start", ("span", "a")), _msg("tag", ("span", "a"))])
    assert now is None and later is not None
    assert KEY not in agent.registry and len(router.forwarded) == 1
    assert later() is None
    assert KEY in agent.registry and router.routed == []

    now, later = agent.prepare([_msg("inject", ("inject", "a"))])
    assert later is None and now is not None
    assert [a.name for a in now()] == ["traceparent"]
    assert [c.key for c in router.routed] == [KEY]

    router.drains_per_read = False  # a mesh that drains before each command: all now
    now, later = agent.prepare([_msg("tag", ("span", "a"))])
    assert later is None and now is not None


def test_a_plain_agent_does_everything_before_the_ack() -> None:
    agent = Agent("plain")
    agent.on_message("m", lambda args: [SetVar(Scope.TXN, "v", args[0][1])])
    now, later = agent.prepare([Message("m", [("x", 5)])])
    assert later is None and now is not None
    assert now() == [SetVar(Scope.TXN, "v", 5)]


def _ready_pair(agent: Agent | None = None) -> tuple[_Client, socket.socket]:
    """A server-side _Client on one end of a gevent socket pair, past HELLO; the peer end.
    With ``agent``, its connection acks early what the agent says it may, as the server's."""
    ours, peer = gevent.socket.socketpair()
    conn = SpopConnection(empty_ack=agent.empty_ack_check() if agent is not None else None)
    conn.receive_data(codec.encode_frame(FrameType.HAPROXY_HELLO, 0, 0, codec.encode_kv_list(
        {"supported-versions": "2.0", "max-frame-size": 16380, "capabilities": "pipelining"})))
    client = _Client(conn, ours, None)
    client.flush()
    peer.recv(65536)  # the AGENT-HELLO
    return client, peer


def _peer_bytes(peer: socket.socket) -> bytes:
    """What the peer can read right now, without waiting (a wait would yield to the hub)."""
    peer.settimeout(0.0)
    try:
        return peer.recv(1 << 20)
    except BlockingIOError:
        return b""
    finally:
        peer.settimeout(None)


def _server_for(agent: Agent) -> tuple[Any, socket.socket]:
    """A server for ``agent`` that is not serving (the tests call its ``_feed``), and its
    listener, for the test to close."""
    from spoe_agent.server import SpoaServer

    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    return SpoaServer(agent, AgentConfig(exporter="none"), listener=listener), listener


def _before_each_apply(monkeypatch: Any, agent: TracingAgent, call: Any) -> None:
    """Have ``call()`` run as the agent's registry is about to apply each command."""
    registry = agent.registry

    class Spy:  # a stand-in: a SessionRegistry compiled with mypyc has no patchable methods
        def apply(self, command: Any) -> Any:
            call()
            return registry.apply(command)

    monkeypatch.setattr(agent, "registry", Spy())


def test_deferred_work_runs_once_the_ack_is_in_the_kernel() -> None:
    client, peer = _ready_pair()
    try:
        client.conn.send_ack(7, 1)
        expected = codec.ack(7, 1)
        seen: list[bytes] = []
        client.flush([lambda: seen.append(_peer_bytes(peer))])
        assert seen == [expected]  # readable by HAProxy before the work began
    finally:
        client.sock.close()
        peer.close()


def test_deferred_work_runs_before_a_write_that_has_to_wait() -> None:
    """The kernel takes none of the ACK (the peer reads nothing): the work runs first, then
    the write waits for the peer, yielding; everything still arrives, in order."""
    client, peer = _ready_pair()
    try:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        filler = b"\0" * 4096
        queued = 0
        while True:  # fill the socket until the kernel takes no more
            try:
                queued += client.raw.send(filler)
            except BlockingIOError:
                break
        client.conn.send_ack(9, 2)
        order: list[str] = []
        received = bytearray()

        def read_all() -> None:
            order.append("peer reads")
            while len(received) < queued + len(codec.ack(9, 2)):
                received.extend(peer.recv(65536))

        reader = gevent.spawn(read_all)
        client.flush([lambda: order.append("work")])
        reader.join(timeout=10)
        assert order == ["work", "peer reads"]  # the work ran before the write could yield
        assert bytes(received[queued:]) == codec.ack(9, 2)
    finally:
        client.sock.close()
        peer.close()


def test_a_batch_defers_its_work_past_every_ack_and_keeps_the_session_order(
    spoe_agent,
) -> None:
    """One read holding a stream's deferred events then an inject (HAProxy pipelining): the
    inject must see the spans the deferred events started, and every frame gets its ACK."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    agent = spoe_agent(app=None, env={**env, "OTEL_TRACES_EXPORTER": "none"})
    with SpopClient((agent.host, agent.port)) as client:
        client.handshake()
        client.send(b"".join([
            codec.notify(5, 1, [_msg("s", ("span", "root"), ("kind", "server"))]),
            codec.notify(5, 2, [_msg("c", ("span", "child"), ("child-of", "root"))]),
            codec.notify(5, 3, [_msg("i", ("inject", "child"))]),
        ]))
        frames = [client.read_frame() for _ in range(3)]
    assert [(f.type, f.stream_id, f.frame_id) for f in frames] == [
        (FrameType.ACK, 5, 1), (FrameType.ACK, 5, 2), (FrameType.ACK, 5, 3)]
    assert frames[0].payload == frames[1].payload == b""
    actions = codec.decode_actions(frames[2].payload)
    assert [a.name for a in actions] == ["traceparent"]


def test_after_notifies_runs_once_per_read_before_its_inline_acks_are_queued() -> None:
    """The workers' mesh writes a read's forwarded commands there: HAProxy must not have an
    ACK (nor a concurrent handler flush one) before the hook is done, even if it yields."""
    agent = Agent("hooks")
    agent.on_message("m", lambda args: [SetVar(Scope.TXN, "v", args[0][1])])
    client, peer = _ready_pair()
    calls: list[tuple[bytes, int]] = []

    def after() -> None:
        gevent.sleep(0.01)  # yields, as a write to a full peer buffer would
        calls.append((_peer_bytes(peer), len(handled)))

    handled: list[int] = []
    agent.on_message("h", lambda args: handled.append(args[0][1]))
    agent.on_message("c", lambda args: [SetVar(Scope.TXN, "c", 1)], concurrent=True)
    agent.after_notifies.append(after)
    server, listener = _server_for(agent)
    try:
        concurrent = codec.notify(99, 1, [Message("c", [])])
        read = concurrent + b"".join(codec.notify(1 + 2 * i, 1, [Message("h", [("i", i)]),
                                                                 Message("m", [("x", i)])])
                                     for i in range(3))
        server._feed(client, read)
        # After the three inline NOTIFYs; meanwhile the concurrent handler ran and wrote its
        # own ACK, and only that one.
        assert calls == [(codec.ack(99, 1, [SetVar(Scope.TXN, "c", 1)]), 3)]
        assert _peer_bytes(peer) == b"".join(
            codec.ack(1 + 2 * i, 1, [SetVar(Scope.TXN, "v", i)]) for i in range(3))
        server._feed(client, codec.notify(9, 1, [Message("h", [("i", 9)])]))
        assert calls[1:] == [(b"", 4)]
    finally:
        listener.close()
        client.sock.close()
        peer.close()


def test_deferred_work_runs_first_when_a_concurrent_handler_holds_the_write_lock() -> None:
    """Waiting for the lock would let a third greenlet send the read's ACKs before the work
    they stand for was done (HAProxy would then send the stream's next event): so it runs
    before the wait."""
    agent = _agent()
    client, peer = _ready_pair()
    server, listener = _server_for(agent)
    try:
        client.lock.acquire()  # a concurrent handler is writing
        feeding = gevent.spawn(server._feed, client,
                               codec.notify(3, 1, [_msg("start", ("span", "a"))]))
        gevent.sleep(0.01)
        assert not feeding.ready()  # waiting for the lock, its ACK queued but not sent
        assert KEY in agent.registry  # and the work behind it done
        client.lock.release()
        feeding.join(5)
        assert feeding.successful()
        assert _peer_bytes(peer) == codec.ack(3, 1)
    finally:
        client.sock.close()
        peer.close()
        listener.close()


# --------------------------------------------- ACKs written before the work (empty_ack_check)


def test_the_tracing_agent_acks_early_only_what_cannot_inject() -> None:
    agent = _agent()
    check = agent.empty_ack_check()
    assert check is not None
    plain = codec.encode_messages([_msg("s", ("span", "a"), ("tag", "url.path"), ("", "/x"))])
    inject = codec.encode_messages([_msg("s", ("span", "a")), _msg("i", ("inject", "a"))])
    assert check(plain) and not check(inject)
    # Those bytes anywhere (a URL) only make the ACK wait.
    assert not check(codec.encode_messages([_msg("s", ("", "\x06inject"))]))
    # With workers or handlers, messages may be routed before the ACK: always wait.
    agent.router = _Router(agent, {KEY})
    assert agent.empty_ack_check() is None
    agent.router = None
    agent.on_message("mine", lambda args: None)
    assert agent.empty_ack_check() is None
    assert Agent("plain").empty_ack_check() is None


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(st.lists(st.tuples(
    st.sampled_from(["span", "inject", "Inject", "injects", "child-of", "tag", "", "id", "x"]),
    st.one_of(st.sampled_from(["a", "inject", "\x06inject", ""]), st.integers(0, 300))),
    max_size=6), min_size=1, max_size=3))
def test_what_the_check_acks_early_never_sets_variables(tails: list[list[tuple[str, Any]]]) -> None:
    """Sound for any message: if it passes, applying the messages answers no variables."""
    agent = _agent()
    messages = [_msg(f"m{i}", *tail) for i, tail in enumerate(tails)]
    if agent.empty_ack_check()(codec.encode_messages(messages)):
        now, _ = agent.prepare(messages)
        assert now is None


def test_a_notify_that_cannot_inject_has_its_ack_in_the_kernel_before_it_is_compiled(
    monkeypatch,
) -> None:
    """Its ACK goes out as soon as it decoded, before the agent compiles its messages (and
    applies them, after the ACK as before); an inject's ACK waits for its variables. A read
    that holds both keeps its one write, at the end, for all its ACKs."""
    agent = _agent()
    seen: list[bytes] = []
    client, peer = _ready_pair(agent)
    prepare = agent.prepare

    def spied(messages: list[Message]) -> Any:
        seen.append(_peer_bytes(peer))
        return prepare(messages)

    monkeypatch.setattr(agent, "prepare", spied)
    server, listener = _server_for(agent)
    try:
        server._feed(client, codec.notify(5, 1, [_msg("s", ("span", "a"))]))
        server._feed(client, codec.notify(5, 2, [_msg("i", ("inject", "a"))]))
        assert seen == [codec.ack(5, 1), b""]
        out = _peer_bytes(peer)
        ack = codec.decode_frame(out[4:])
        assert (ack.type, ack.stream_id, ack.frame_id) == (FrameType.ACK, 5, 2)
        assert [a.name for a in codec.decode_actions(ack.payload)] == ["traceparent"]
        assert server.stats.acks == 2 and server.stats.notifies == 2

        seen.clear()
        server._feed(client, codec.notify(7, 1, [_msg("s", ("span", "b"))])
                     + codec.notify(7, 2, [_msg("i", ("inject", "b"))]))
        assert seen == [b"", b""]
        out = _peer_bytes(peer)
        assert out[:len(codec.ack(7, 1))] == codec.ack(7, 1)
        assert codec.decode_frame(out[len(codec.ack(7, 1)) + 4:]).frame_id == 2
    finally:
        client.sock.close()
        peer.close()
        listener.close()


def test_an_early_ack_the_kernel_cannot_take_yet_leaves_first_with_the_next_write(
    monkeypatch,
) -> None:
    """The socket is full: the early write takes nothing and must not wait (the NOTIFYs are
    not applied yet). The work runs first, then the read's last write waits for the peer and
    sends the early ACKs, in order; what the next read ACKs comes after them."""
    agent = _agent()
    order: list[str] = []
    _before_each_apply(monkeypatch, agent, lambda: order.append("applied"))
    client, peer = _ready_pair(agent)
    server, listener = _server_for(agent)
    try:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        queued = 0
        while True:  # fill the socket until the kernel takes no more
            try:
                queued += client.raw.send(b"\0" * 4096)
            except BlockingIOError:
                break
        early = codec.ack(3, 1) + codec.ack(3, 2)
        received = bytearray()

        def read_all() -> None:
            order.append("peer reads")
            while len(received) < queued + len(early):
                received.extend(peer.recv(65536))

        reader = gevent.spawn(read_all)
        server._feed(client, codec.notify(3, 1, [_msg("s", ("span", "a"))])
                     + codec.notify(3, 2, [_msg("t", ("span", "a"), ("tag", "k"), ("", 1))]))
        reader.join(timeout=10)
        assert order == ["applied", "applied", "peer reads"]
        assert bytes(received[queued:]) == early and client.unsent == b""
        server._feed(client, codec.notify(5, 1, [_msg("u", ("span", "b"))]))
        assert _peer_bytes(peer) == codec.ack(5, 1)
    finally:
        client.sock.close()
        peer.close()
        listener.close()


def test_an_app_may_ack_early_what_it_knows_answers_nothing(caplog) -> None:
    """``Agent.empty_ack_check`` is any app's to give: its handlers then run once the ACK is
    out. One that answers variables all the same has them lost, and that is logged."""

    class Counting(Agent):
        def empty_ack_check(self) -> Any:
            return lambda payload: payload.startswith(b"\x05count")

    agent = Counting("counting")
    seen: list[bytes] = []

    def count(args: list[tuple[str, Any]]) -> Any:
        seen.append(_peer_bytes(peer))
        return [SetVar(Scope.TXN, "n", 1)] if args else None

    agent.on_message("count", count)
    client, peer = _ready_pair(agent)
    server, listener = _server_for(agent)
    try:
        server._feed(client, codec.notify(1, 1, [Message("count", [])]))
        assert seen == [codec.ack(1, 1)] and "lost" not in caplog.text
        server._feed(client, codec.notify(3, 1, [Message("count", [("bad", 1)])]))
        assert seen[1:] == [codec.ack(3, 1)] and _peer_bytes(peer) == b""
        assert "stream 3 frame 1 was ACKed before its messages were handled" in caplog.text

        # A concurrent handler runs in its own greenlet, after the ACK, which it does not send
        # again.
        agent.on_message("count", count, concurrent=True)
        server._feed(client, codec.notify(5, 1, [Message("count", [])]))
        assert _peer_bytes(peer) == codec.ack(5, 1)
        assert len(seen) == 2
        client.pool.join(timeout=5)
        assert seen[2:] == [b""] and _peer_bytes(peer) == b""
        assert server.stats.acks == server.stats.notifies == 3
    finally:
        client.sock.close()
        peer.close()
        listener.close()


def test_a_message_after_its_own_events_finish_star_is_dropped_not_a_second_trace(
        caplog: Any) -> None:
    """Black-box run: with the message that has finish=str("*") listed first, the event's
    next message started a second trace of the request's last spans, silently. One NOTIFY is
    one stream: such a message belongs to the session just ended."""
    import logging

    agent = _agent()
    registry = agent.registry

    def last_event(key: str) -> list[Message]:
        return [
            Message("m-err", [("id", key), ("span", "request"), ("tag", "error"), ("", True),
                              ("finish", "*")]),
            Message("m-end", [("id", key), ("span", "request"),
                              ("tag", "http.response.status_code"), ("", 503), ("finish", "*")]),
        ]

    agent.prepare([_msg("start", ("span", "request"))])[1]()
    now, later = agent.prepare(last_event(KEY))
    assert now is None and later is not None
    later()
    assert KEY not in registry
    assert (registry.stats["sessions_started"], registry.stats["after_finish"]) == (1, 1)
    # The path a NOTIFY takes when it must be dispatched message by message.
    other = "0a1b2c3d-0000-4000-8000-000000000002"
    agent.dispatch([Message("start", [("id", other), ("span", "request")])])
    agent.dispatch(last_event(other))
    assert other not in registry
    assert (registry.stats["sessions_started"], registry.stats["after_finish"]) == (2, 2)
    # A later event of the stream is another NOTIFY: a new session, as the README says.
    agent.prepare([_msg("late", ("span", "x"))])[1]()
    assert KEY in registry
    with caplog.at_level(logging.INFO, logger="spoe_agent.tracing.agent"):
        agent._report_limits(final=True)
    assert ('2 SPOE messages came after the message with finish=str("*") of their own event '
            "since the last report, and were ignored") in caplog.text


def test_mistakes_that_were_only_counted_are_logged_and_named(caplog: Any) -> None:
    """Black-box run: a finish= or child-of= typo, a context after the trace was fixed and a
    bad kind= value were counted but never said, or said without the value."""
    import logging

    from spoe_agent.tracing.language import BAD_KINDS

    BAD_KINDS.clear()  # what other tests met, held for the next report
    agent = _agent()
    for work in (
        agent.prepare([_msg("a", ("span", "root"), ("span", "x"), ("child-of", "Frontend TCP reqeust"),
                            ("kind", "srv"))])[1],
        agent.prepare([_msg("b", ("finish", "Fronted TCP request"), ("inject", "root"))])[0],
        agent.prepare([_msg("c", ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"))])[1],
    ):
        assert work is not None
        work()
    with caplog.at_level(logging.INFO, logger="spoe_agent.tracing.agent"):
        agent._report_limits(final=True)
    lines = {r.getMessage().split(" ", 2)[1]: (r.levelno, r.getMessage()) for r in caplog.records}
    assert "kind=" in caplog.text and "(values first met since the last report: 'srv')" in caplog.text
    assert lines["finish=,"] == (logging.INFO, lines["finish=,"][1])
    assert "(last: 'Fronted TCP request')" in lines["finish=,"][1]
    assert lines["incoming"][0] == logging.WARNING
    assert lines["incoming"][1].startswith("1 incoming trace contexts (traceparent= and the "
                                           "other propagation arguments) came after")
