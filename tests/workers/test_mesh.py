"""The gevent shell of routing: real unix sockets between meshes living in this process.

Each mesh plays one worker with its own registry; the streams' events are routed through
different meshes, as HAProxy spreads them over the workers' connections, and the union of what
the registries emitted must be the single-process result.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gevent
import pytest
from gevent import socket
from opentelemetry.sdk.trace import ReadableSpan

from spoe_agent.protocol.types import Message
from spoe_agent.tracing.registry import SessionRegistry
from spoe_agent.workers.mesh import LOST, PeerMesh, _Link, peer_path
from spoe_agent.workers.router import (
    BATCH,
    COMMAND,
    HELLO,
    SYNC,
    FrameReader,
    encode,
)
from tests.workers.streams import expected_shape, registry, shapes, stream

KEYS = [f"{i:08x}-7a1e-4c3b-8d2f-{i * 104729:012x}" for i in range(400)]


@dataclass
class Node:
    mesh: PeerMesh
    reg: SessionRegistry
    spans: list[ReadableSpan] = field(default_factory=list)


@pytest.fixture
def runtime_dir() -> Iterator[str]:
    # Not tmp_path: a unix socket path must stay under ~107 bytes.
    path = tempfile.mkdtemp(prefix="spoe-mesh-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cluster(runtime_dir: str) -> Iterator[Callable[..., list[Node]]]:
    """Factory: ``cluster(n, only=None, **mesh_kwargs)`` starts meshes ``only`` (default all)
    of ``n`` together, as the supervisor does, and returns them by index."""
    made: list[Node] = []

    def start(n: int, only: list[int] | None = None, **kwargs: object) -> list[Node]:
        nodes = []
        for index in range(n) if only is None else only:
            spans: list[ReadableSpan] = []
            reg = registry(spans)
            mesh = PeerMesh(index, n, runtime_dir, reg, **kwargs)  # type: ignore[arg-type]
            nodes.append(Node(mesh, reg, spans))
        with gevent.Timeout(10):
            gevent.joinall([gevent.spawn(node.mesh.start) for node in nodes], raise_error=True)
        made.extend(nodes)
        return nodes

    yield start
    for node in made:
        node.mesh.stop()


def settle(nodes: list[Node]) -> None:
    """What ticks would do: every owner drains and applies what is waiting for it, twice, so
    what the first round made a worker announce reaches the others too; then more rounds
    while any round still changes something. Two rounds of one loop pass each were enough on
    an idle machine, not always under load (the full suite on 2 busy cores: a peer's reader
    greenlet not yet run), and a test then saw a state still on its way."""
    def state() -> list[object]:
        return [(n.mesh.counters(), n.mesh.peer_sessions, len(n.reg), len(n.spans))
                for n in nodes]

    deadline = time.monotonic() + 5.0
    rounds, before = 0, state()
    while True:
        gevent.sleep(0 if rounds < 2 else 0.005)
        for node in nodes:
            node.mesh.pump()
        rounds, after = rounds + 1, state()
        if rounds >= 2 and (after == before or time.monotonic() > deadline):
            return
        before = after


def take(node: Node, keys: list[str]) -> None:
    """``node`` receives the first event of each stream, so it owns the sessions, and tells
    its peers (before that event's ACK, which here is before this returns)."""
    for key in keys:
        node.mesh.route(stream(key)[0])


class _Watched:
    """A registry whose ``apply`` is ``apply``: the mesh takes a registry, not a function."""

    def __init__(self, reg: SessionRegistry, apply: Callable[[Any], Any]) -> None:
        self._reg = reg
        self.apply = apply

    def __contains__(self, key: object) -> bool:
        return key in self._reg

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reg, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("_reg", "apply"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._reg, name, value)


# ---------------------------------------------------------------------------------- tests


def test_streams_spread_over_workers_build_the_single_process_traces(
    cluster: Callable[..., list[Node]],
) -> None:
    nodes = cluster(3)
    keys = KEYS[:90]
    streams = {key: stream(key, inject=True) for key in keys}
    injected: dict[str, str] = {}
    for step in range(4):
        for n, key in enumerate(keys):
            via = nodes[(n + step) % 3]  # each event through another worker than the last
            actions = via.mesh.route(streams[key][step])
            if step == 2:
                (var,) = actions
                injected[key] = var.value
            else:
                assert actions == []
    settle(nodes)

    everything = [span for node in nodes for span in node.spans]
    assert shapes(everything) == Counter({expected_shape(key): 1 for key in keys})
    for index, node in enumerate(nodes):
        # Each session lived in its owner's registry only, and nothing is left open.
        # The owner is the worker that received the first event.
        paths = {s.attributes["http.path"] for s in node.spans if s.name == "root"}
        assert paths == {f"/{k}" for n, k in enumerate(keys) if n % 3 == index}
        assert len(node.reg) == 0
        assert node.mesh.peer_sessions == 0  # every peer said its sessions ended
        assert node.reg.stats["unknown_span"] == node.reg.stats["unknown_parent"] == 0
    # The inject answered with the context of the span the owner emitted.
    by_path = {s.attributes["http.path"]: s for s in everything if s.name == "root"}
    for key, traceparent in injected.items():
        trace_id = by_path[f"/{key}"].context.trace_id
        _, tid, parent, _ = traceparent.split("-")
        assert int(tid, 16) == trace_id
        (nxt,) = [s for s in everything if s.context.trace_id == trace_id and s.name == "next"]
        assert int(parent, 16) == nxt.context.span_id
    counters = [node.mesh.counters() for node in nodes]
    assert sum(c["forwarded"] for c in counters) == sum(c["received"] for c in counters) > 0
    assert sum(c["forwarded_inject"] for c in counters) > 0
    assert all(c["held"] == c["inject_timeout"] == c["inject_unavailable"] == 0
               for c in counters), counters


def test_a_worker_owning_the_session_applies_it_without_forwarding(
    cluster: Callable[..., list[Node]],
) -> None:
    nodes = cluster(2)
    key = KEYS[0]
    for command in stream(key, inject=True):
        nodes[0].mesh.route(command)
    assert shapes(nodes[0].spans) == Counter({expected_shape(key): 1})
    assert nodes[0].mesh.counters()["forwarded"] == 0
    settle(nodes)
    assert nodes[1].mesh.counters()["received"] == 0
    assert nodes[1].mesh.peer_sessions == 0


@pytest.mark.parametrize("drains_per_read", [False, True])
def test_a_local_command_drains_first_unless_the_server_drains_per_read(
    cluster: Callable[..., list[Node]], drains_per_read: bool,
) -> None:
    nodes = cluster(2)
    forwarded, local = KEYS[:2]
    take(nodes[0], [forwarded])
    nodes[1].mesh.route(stream(forwarded)[1])  # waits in worker 0's bulk link, unwatched
    assert nodes[1].mesh.counters()["forwarded"] == 1
    owner = nodes[0].mesh
    before: list[Callable[[], None]] = []
    after: list[Callable[[], None]] = []
    if drains_per_read:
        owner.drain_per_read(before, after)
        assert len(before) == len(after) == 1
    owner.route(stream(local)[0])
    # Draining per read, what the server runs before the next read's NOTIFYs takes it in.
    assert owner.counters()["received"] == (0 if drains_per_read else 1)
    _read(owner, before, after, [])
    assert owner.counters()["received"] == 1
    assert forwarded in nodes[0].reg and local in nodes[0].reg


def _read(mesh: PeerMesh, before: list[Callable[[], None]], after: list[Callable[[], None]],
          commands: list[Any]) -> list[list[Any]]:
    """What the server does with one read of NOTIFYs handled inline, one command each."""
    for hook in before:
        hook()
    try:
        return [mesh.route(command) for command in commands]
    finally:
        for hook in after:
            hook()


def _count_writes(monkeypatch: pytest.MonkeyPatch) -> Counter[int | None]:
    """From now on, the frames each link writes, by peer."""
    writes: Counter[int | None] = Counter()
    send = _Link.send

    def counted(link: _Link, data: bytes) -> int:
        writes[link.peer] += 1
        return send(link, data)

    monkeypatch.setattr(_Link, "send", counted)
    return writes


def test_a_reads_forwards_are_written_once_per_owner_before_its_acks(
    cluster: Callable[..., list[Node]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    nodes = cluster(3)
    mesh = nodes[0].mesh
    before: list[Callable[[], None]] = []
    after: list[Callable[[], None]] = []
    mesh.drain_per_read(before, after)
    keys = {owner: KEYS[3 * owner:3 * owner + 3] for owner in (1, 2)}
    for owner, owned_keys in keys.items():
        take(nodes[owner], owned_keys)
    writes = _count_writes(monkeypatch)
    seen: list[int] = []
    after.insert(0, lambda: seen.append(nodes[1].mesh.counters()["received"]))
    commands = [stream(key)[step] for step in (1, 2) for ks in keys.values() for key in ks]
    assert _read(mesh, before, after, commands) == [[]] * len(commands)
    assert seen == [0]  # nothing was written while the read was handled
    assert writes == Counter({1: 1, 2: 1})  # then one frame per owner
    settle(nodes)
    for owner, owned_keys in keys.items():
        assert nodes[owner].mesh.counters()["received"] == 6
        assert all(key in nodes[owner].reg for key in owned_keys)
    assert mesh.counters()["forwarded"] == 12
    for owner, owned_keys in keys.items():  # the rest of each stream
        _read(mesh, before, after, [stream(key)[3] for key in owned_keys])
        settle(nodes)
        assert shapes(nodes[owner].spans) == Counter(
            {expected_shape(key): 1 for key in owned_keys})


def test_a_workers_own_commands_can_wait_for_their_acks(
    cluster: Callable[..., list[Node]],
) -> None:
    """``keep_own``: the commands other workers own join the read's batch (written before its
    ACKs), those that open a session are applied at once, this worker's own are applied after
    the read, as the server's deferred work is;
    with every event through the other worker than the last, the traces are those of one
    process."""
    nodes = cluster(2)
    hooks = []
    for node in nodes:
        before: list[Callable[[], None]] = []
        after: list[Callable[[], None]] = []
        node.mesh.drain_per_read(before, after)
        hooks.append((before, after))
    keys = KEYS[:6]
    for step in range(4):
        for n, key in enumerate(keys):
            index = (n + step) % 2
            node = nodes[index]
            before, after = hooks[index]
            for hook in before:
                hook()
            command = stream(key)[step]
            own = node.mesh.keep_own([command])
            if step == 0:
                # Nobody's yet: applied at once (the worker owns what it announces).
                assert own == [] and key in node.reg
            else:
                assert own == ([command] if n % 2 == index else [])  # the first event's worker
            for hook in after:
                hook()
            for mine in own:  # the deferred work, before the next read
                node.reg.apply(mine)
    settle(nodes)
    for index, node in enumerate(nodes):
        assert shapes(node.spans) == Counter(
            {expected_shape(key): 1 for n, key in enumerate(keys) if n % 2 == index})
        assert node.reg.stats["unknown_span"] == node.reg.stats["unknown_parent"] == 0
        assert node.mesh.counters()["received"] == 6  # half of each owner's 12 events


def test_an_inject_handled_inline_follows_what_its_read_forwarded(
    cluster: Callable[..., list[Node]],
) -> None:
    """The server guessed wrong (the NOTIFY's inject was not seen): the RPC must not overtake
    the batch the same read filled for the same session."""
    nodes = cluster(2)
    mesh = nodes[0].mesh
    before: list[Callable[[], None]] = []
    after: list[Callable[[], None]] = []
    mesh.drain_per_read(before, after)
    key = KEYS[0]
    commands = stream(key, inject=True)
    take(nodes[1], [key])
    results = _read(mesh, before, after, commands[1:])
    (var,) = results[1]
    settle(nodes)
    assert shapes(nodes[1].spans) == Counter({expected_shape(key): 1})
    (nxt,) = [s for s in nodes[1].spans if s.name == "next"]
    assert var.value.split("-")[2] == f"{nxt.context.span_id:016x}"


def test_a_message_seen_without_inject_is_not_searched_again(
    cluster: Callable[..., list[Node]],
) -> None:
    nodes = cluster(2)
    mesh = nodes[0].mesh
    remote, local = KEYS[:2]
    take(nodes[1], [remote])
    settle(nodes)
    plain = Message("m", [("id", remote), ("span", "x")])
    assert not mesh.waits_for_owner([plain])
    # Remembered: the same name with as many arguments is not searched (were it an inject,
    # it would be handled inline: its read waits for the owner, the trace is the same).
    assert not mesh.waits_for_owner([Message("m", [("id", remote), ("inject", "x")])])
    # The same name with other arguments (HAProxy's configuration changed) is searched.
    assert mesh.waits_for_owner([Message("m", [("id", remote), ("span", "x"), ("inject", "x")])])
    assert mesh.waits_for_owner([plain, Message("n", [("id", remote), ("inject", "x")])])
    assert not mesh.waits_for_owner([Message("n", [("id", local), ("inject", "x")])])


def test_the_sessions_of_a_worker_that_died_are_dropped_not_split(
    cluster: Callable[..., list[Node]],
) -> None:
    """What was held for a dead owner, and the later events of its sessions, belong to sessions
    that died with it (their roots in its memory). Applied by the replacement, or by whoever
    HAProxy sends them to, they opened fragments of those traces that looked like whole
    requests. They are dropped and counted for one session TTL; then the keys are free."""
    first, second = cluster(2, lost_window=0.6)
    keys = KEYS[:20]
    take(second, keys)
    settle([first])
    assert first.mesh.peer_sessions == len(keys)
    second.mesh.stop()  # worker 1 dies (its sessions with it); its replacement is on its way
    for key in keys:
        for command in stream(key, inject=True)[1:3]:
            assert first.mesh.route(command) == []  # the inject cannot be answered
    held = first.mesh.counters()
    assert held["held"] == 2 * len(keys)
    assert held["inject_unavailable"] == len(keys)
    assert held["forwarded"] == 0

    (replacement,) = cluster(2, only=[1], lost_window=0.6)  # it syncs before serving
    settle([first, replacement])
    assert first.mesh.counters()["lost_with_owner"] == 2 * len(keys)
    assert replacement.mesh.counters()["received"] == 0 and len(replacement.reg) == 0
    # The rest of each stream, here or inlined in a read, opens nothing either.
    for key in keys[:10]:
        assert first.mesh.route(stream(key)[3]) == []
    assert first.mesh.keep_own([stream(key)[3] for key in keys[10:]]) == []
    assert not first.mesh.waits_for_owner([Message("c", [("id", keys[0]), ("inject", "x")])])
    settle([first, replacement])
    assert len(first.reg) == 0 and len(replacement.reg) == 0
    assert not first.spans and not replacement.spans
    assert first.mesh.counters()["lost_with_owner"] == 3 * len(keys)
    assert first.mesh.counters()["held_dropped"] == 0
    # Once the window has passed, a key is a new session's again.
    deadline = time.monotonic() + 10
    while first.mesh.peer_sessions:
        assert time.monotonic() < deadline
        gevent.sleep(0.05)
    take(first, keys[:1])
    assert keys[0] in first.reg


def test_a_replacement_learns_which_sessions_its_peers_hold_and_forgets_its_predecessors(
    cluster: Callable[..., list[Node]],
) -> None:
    first, second = cluster(2)
    take(first, KEYS[:5])
    take(second, KEYS[5:10])
    settle([first, second])
    assert first.mesh.peer_sessions == second.mesh.peer_sessions == 5
    second.mesh.stop()
    (replacement,) = cluster(2, only=[1])
    settle([first, replacement])
    # What worker 1 held died with it: first routes them nowhere any more.
    assert {first.mesh.owner(key) for key in KEYS[5:10]} == {LOST}
    assert replacement.mesh.peer_sessions == 5  # told before it served anything
    for key in KEYS[:5]:
        for command in stream(key)[1:]:
            replacement.mesh.route(command)
    settle([first, replacement])
    assert shapes(first.spans) == Counter({expected_shape(key): 1 for key in KEYS[:5]})
    assert not replacement.spans and replacement.mesh.peer_sessions == 0


def _ended_then_forwarded(nodes: list[Node], key: str, late: Any) -> tuple[Any, Any]:
    """Worker 0 ends session ``key`` and says so while worker 1, which has not read that yet
    (its read's drain came first), forwards ``late`` for the same key to worker 0."""
    before: list[Callable[[], None]] = []
    after: list[Callable[[], None]] = []
    nodes[1].mesh.drain_per_read(before, after)
    take(nodes[0], [key])
    _read(nodes[1].mesh, before, after, [])
    assert nodes[1].mesh.peer_sessions == 1
    for command in stream(key)[1:]:
        nodes[0].mesh.route(command)
    for hook in before:
        hook()
    nodes[0].mesh.pump()  # writes "ended"
    assert nodes[1].mesh.route(late) == []  # to worker 0, as far as worker 1 knows
    for hook in after:
        hook()
    return before, after


def test_an_end_that_crosses_a_forward_of_the_same_key_leaves_the_stream_whole(
    cluster: Callable[..., list[Node]],
) -> None:
    """A key used again (a per-connection id) or an event after ``finish=*``: worker 0 opens
    the session anew when it applies the forward, so worker 1 must keep routing there even
    though it reads the end first."""
    nodes = cluster(2)
    key = KEYS[0]
    again = stream(key)
    before, after = _ended_then_forwarded(nodes, key, again[0])
    for command in again[1:]:
        _read(nodes[1].mesh, before, after, [command])
        settle(nodes)
    assert shapes(nodes[0].spans) == Counter({expected_shape(key): 2})
    assert not nodes[1].spans
    assert nodes[1].mesh.peer_sessions == 0


def test_an_end_read_while_the_forward_waits_for_the_kernel_still_leaves_the_stream_whole(
    cluster: Callable[..., list[Node]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same crossing, but the owner's "ended" is read while the forward is still on its way
    to the kernel (its writer waits, another greenlet pumps): the forward already counts."""
    nodes = cluster(2)
    key = KEYS[0]
    again = stream(key)
    mesh = nodes[1].mesh
    waits: list[int] = []
    wait_sent = _Link.wait_sent

    def pumped_meanwhile(link: _Link, end: int) -> bool:
        if link._mesh is mesh and link.peer == 0 and not waits:
            waits.append(end)
            mesh.pump()  # reads worker 0's "ended" before the kernel has the forward
        return wait_sent(link, end)

    monkeypatch.setattr(_Link, "wait_sent", pumped_meanwhile)
    before, after = _ended_then_forwarded(nodes, key, again[0])
    assert waits, "the forward never waited"
    assert mesh.peer_sessions == 1  # kept: worker 0 has not applied the forward yet
    for command in again[1:]:
        _read(mesh, before, after, [command])
        settle(nodes)
    assert shapes(nodes[0].spans) == Counter({expected_shape(key): 2})
    assert not nodes[1].spans
    assert mesh.peer_sessions == 0


def test_a_forward_that_finds_the_session_gone_leaves_no_entry_behind(
    cluster: Callable[..., list[Node]],
) -> None:
    nodes = cluster(2)
    key = KEYS[0]
    before, after = _ended_then_forwarded(nodes, key, stream(key)[3])  # a late finish=*
    _read(nodes[1].mesh, before, after, [])
    assert nodes[1].mesh.peer_sessions == 1  # the end crossed the forward: kept
    settle(nodes)
    # Worker 0 had nothing to finish, and said so once more, after applying the forward.
    assert nodes[0].reg.stats["unknown_session"] == 1
    assert nodes[1].mesh.peer_sessions == 0


def test_the_rest_of_a_stream_evicted_by_its_owner_goes_back_there_as_late(
    cluster: Callable[..., list[Node]],
) -> None:
    """A slow response, a long websocket: the owner ended the session by TTL and counts what
    comes after as late (one process does). A peer that forgot the owner would open a second,
    orphan trace with a second "HAProxy session" span."""
    a, b = cluster(2)
    key = KEYS[0]
    commands = stream(key)
    take(a, [key])
    settle([a, b])
    later = time.monotonic_ns() + 10**12  # past the TTL (on its clock)
    assert a.reg.expire(now_ns=later) == 1
    settle([a, b])
    assert b.mesh.peer_sessions == 1  # the owner still answers for the key
    for command in commands[1:]:
        b.mesh.route(command)
        settle([a, b])
    assert a.reg.stats["late_message"] == 3
    assert b.reg.stats["sessions_started"] == 0 and not b.spans
    a.reg.expire(now_ns=later + 10**12)  # the key is forgotten in turn: so is the entry
    settle([a, b])
    assert b.mesh.peer_sessions == 0


def test_a_restarted_peer_is_told_every_session_however_many(
    cluster: Callable[..., list[Node]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from spoe_agent.workers import mesh as mesh_module
    from spoe_agent.workers import router as router_module

    # A frame holds ~30 keys at most here (as 16 MiB holds ~400,000): sent 7 per frame.
    monkeypatch.setattr(router_module, "MAX_FRAME", 2000)
    monkeypatch.setattr(mesh_module, "_SNAPSHOT_KEYS", 7)
    first, second = cluster(2)
    take(first, KEYS[:100])
    settle([first, second])
    second.mesh.stop()
    (replacement,) = cluster(2, only=[1])
    settle([first, replacement])
    assert replacement.mesh.peer_sessions == 100


def test_announcements_a_dead_worker_left_unread_are_not_taken_for_its_replacements(
    runtime_dir: str,
) -> None:
    reg = registry([])
    mesh = PeerMesh(0, 2, runtime_dir, reg)
    mesh._syncing = False
    old_ours, old_theirs = socket.socketpair()
    new_ours, new_theirs = socket.socketpair()
    _adopt(mesh, old_ours, 1)
    _adopt(mesh, new_ours, None)  # type: ignore[arg-type]
    old_theirs.sendall(encode((BATCH, 1, (), (KEYS[0],), (), 0)))  # the dead one: "owns"
    new_theirs.sendall(encode((HELLO, 1, True, False)))  # its replacement says hello
    mesh.pump()
    assert mesh.peer_sessions == 0
    for sock in (old_ours, old_theirs, new_ours, new_theirs):
        sock.close()


def test_an_overloaded_owner_still_lets_its_peers_drop_what_ended(
    cluster: Callable[..., list[Node]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Drains cut short (the owner never sees a quiet pass) still say up to when everything
    written was applied, so an "ended" that crossed a forward is taken once it is answered."""
    from spoe_agent.workers import mesh as mesh_module

    a, b = cluster(2)
    key = KEYS[0]
    commands = stream(key)
    take(a, [key])
    settle([a, b])
    for command in commands[1:]:
        a.mesh.route(command)  # finished at a; its "ended" is not written yet
    b.mesh.route(commands[3])  # a late finish=* from b, which has not heard
    monkeypatch.setattr(mesh_module, "_MAX_PASSES", 1)
    for _ in range(3):
        settle([a, b])
    assert a.reg.stats["unknown_session"] == 1
    assert b.mesh.peer_sessions == 0


def test_an_unanswered_inject_gives_up_after_the_timeout(
    cluster: Callable[..., list[Node]], runtime_dir: str,
) -> None:
    # Worker 1 is alive but stuck: it accepts, reads, says SYNC, never replies.
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(peer_path(runtime_dir, 1))
    silent.listen(8)
    received: list[tuple] = []

    def serve(conn: socket.socket) -> None:
        reader = FrameReader()
        while data := conn.recv(65536):
            for frame in reader.feed(data):
                received.append(frame)
                if frame[0] == HELLO and frame[2]:
                    # A fresh worker greets us: answer the way a live peer does.
                    back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    back.connect(peer_path(runtime_dir, 0))
                    back.sendall(encode((HELLO, 1, False, False)) + encode((SYNC,))
                                 + encode((BATCH, 1, (), (key,), (), 0)))  # it owns key
                    conns.append(back)

    conns: list[socket.socket] = []

    servers: list[gevent.Greenlet] = []

    def accept() -> None:
        while True:
            conn, _ = silent.accept()
            conns.append(conn)
            servers.append(gevent.spawn(serve, conn))

    key = KEYS[0]
    acceptor = gevent.spawn(accept)
    try:
        (node,) = cluster(2, only=[0], rpc_timeout=0.05)
        commands = stream(key, inject=True)
        node.mesh.route(commands[0])
        assert node.mesh.route(commands[2]) == []
        assert node.mesh.counters()["inject_timeout"] == 1
        gevent.sleep(0.01)
        # Both commands reached the owner: the forwarded one in a BATCH, the inject alone.
        assert [f[0] for f in received if f[0] in (COMMAND, BATCH)] == [BATCH, COMMAND]
        assert len(received[[f[0] for f in received].index(BATCH)][2]) == 1
    finally:
        acceptor.kill()
        gevent.killall(servers)
        for conn in conns:
            conn.close()
        silent.close()


def test_a_full_bulk_buffer_wakes_an_idle_owner(cluster: Callable[..., list[Node]]) -> None:
    """The owner does not watch bulk links; a forwarder that fills one must not wait forever.
    (tick=3600: only the NUDGE can make the owner drain.)"""
    nodes = cluster(2, tick=3600.0)
    keys = KEYS[:150]
    take(nodes[1], keys)
    big = "x" * 3000
    sent = 0
    with gevent.Timeout(10):
        for key in keys:
            second = stream(key)[1]
            padded = second._replace(
                ops=second.ops + tuple((4, f"pad{i}", big) for i in range(10)))
            nodes[0].mesh.route(padded)
            sent += 1
        # The owner applies what it read, whether a nudge or this settle made it drain.
        settle(nodes)
    assert sent == len(keys)
    assert len(nodes[1].reg) == len(keys)
    assert nodes[1].mesh.counters()["received"] == len(keys)


def test_a_link_opened_right_before_an_inject_is_drained_before_it(
    cluster: Callable[..., list[Node]],
) -> None:
    """A forwarder that (re)connects writes into a link the owner has not accepted yet; the
    inject that follows on the urgent link must still find those commands applied first."""
    nodes = cluster(2)
    first, second = KEYS[:2]
    take(nodes[1], [first, second])
    for command in stream(first, inject=True)[1:]:  # opens the urgent link
        nodes[0].mesh.route(command)
    settle(nodes)
    bulk = nodes[0].mesh._bulk[1]
    assert bulk is not None
    bulk.close()  # as when a link drops: the next command opens a new one
    commands = stream(second, inject=True)
    nodes[0].mesh.route(commands[1])  # now waits in a connection not yet accepted
    (var,) = nodes[0].mesh.route(commands[2])
    nodes[0].mesh.route(commands[3])
    settle(nodes)
    assert shapes(nodes[1].spans) == Counter({expected_shape(first): 1,
                                              expected_shape(second): 1})
    assert var.name == "traceparent"


class _LateWrites:
    """A socket that, once read, lets two peers write: event k on this very link (already read
    in this pass) and event k+1 on a link read after it, as happens when peers write while the
    owner is in the middle of a drain (or descheduled there)."""

    def __init__(self, sock: socket.socket, late: Callable[[], None]) -> None:
        self._sock = sock
        self._late: Callable[[], None] | None = late

    def recv_into(self, buffer: bytearray) -> int:
        n = self._sock.recv_into(buffer)
        if self._late is not None:
            late, self._late = self._late, None
            late()
        return n

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def test_an_event_written_behind_the_drain_is_still_applied_before_its_successor(
    runtime_dir: str,
) -> None:
    from spoe_agent.workers.router import encode_command

    spans: list[ReadableSpan] = []
    reg = registry(spans)
    applied: list[tuple[str, str]] = []

    def apply(command):  # type: ignore[no-untyped-def]
        op = command.ops[0]
        applied.append((command.key, op[1] if len(op) > 1 else "*"))
        return reg.apply(command)

    owner = PeerMesh(0, 3, runtime_dir, _Watched(reg, apply))
    owner._syncing = False
    key, other = KEYS[:2]
    commands = stream(key)
    owner.route(commands[0])
    owner.route(commands[1])
    pairs = [socket.socketpair() for _ in range(2)]
    first_end, second_end = pairs[0][1], pairs[1][1]
    # Both links have something, so one drain pass reads both.
    first_end.sendall(encode_command(stream(other)[0]))
    second_end.sendall(encode_command(stream(other)[1]))

    def peers_write() -> None:
        first_end.sendall(encode_command(commands[2]))  # event k, behind the reader
        second_end.sendall(encode_command(commands[3]))  # then k+1, ahead of it

    _adopt(owner, _LateWrites(pairs[0][0], peers_write), 1)  # type: ignore[arg-type]
    _adopt(owner, pairs[1][0], 2)
    owner.pump()
    assert [name for k, name in applied if k == key] == ["root", "child", "next", "*"]
    assert shapes([s for s in spans if s.attributes.get("http.path") != f"/{other}"]) == (
        Counter({expected_shape(key): 1}))
    for a, b in pairs:
        a.close()
        b.close()


def _adopt(mesh: PeerMesh, sock: socket.socket, peer: int) -> None:
    """An inbound link from ``peer``, drained by the mesh's pumps but watched by nobody."""
    from select import POLLIN

    from spoe_agent.workers.mesh import _Link

    link = _Link(mesh, sock, peer, urgent=False, outbound=False)
    mesh._inbound = [*mesh._inbound, link]
    mesh._poller.register(link.fd, POLLIN)


def test_an_apply_that_yields_does_not_let_another_pump_overtake_it(runtime_dir: str) -> None:
    """The first span of a service makes the registry build a Resource, which yields to the
    hub; a pump that runs meanwhile must not apply a successor before the yielding pump has
    applied what it already took."""
    from spoe_agent.workers.router import encode_command

    spans: list[ReadableSpan] = []
    reg = registry(spans)
    applied: list[tuple[str, str]] = []
    first, second = KEYS[:2]
    a, b = stream(first), stream(second)

    def apply(command):  # type: ignore[no-untyped-def]
        op = command.ops[0]
        applied.append((command.key, op[1] if len(op) > 1 else "*"))
        if len(applied) == 1:
            gevent.sleep(0.01)  # as Resource.create does
        return reg.apply(command)

    owner = PeerMesh(0, 3, runtime_dir, _Watched(reg, apply))
    owner._syncing = False
    pairs = [socket.socketpair() for _ in range(2)]
    _adopt(owner, pairs[0][0], 1)
    _adopt(owner, pairs[1][0], 2)
    pairs[0][1].sendall(encode_command(a[0]) + encode_command(b[0]))
    yielding = gevent.spawn(owner.pump)
    gevent.sleep(0)  # the pump took both commands and is inside the first apply
    pairs[1][1].sendall(encode_command(b[1]))  # b[0] was ACKed when written: b[1] exists
    owner.pump()
    yielding.join()
    order = [name for key, name in applied if key == second]
    assert order == ["root", "child"], applied
    for x, y in pairs:
        x.close()
        y.close()


def test_a_forwarded_frame_without_commands_is_counted_and_the_rest_applied(
    runtime_dir: str,
) -> None:
    from spoe_agent.workers.router import encode_command

    spans: list[ReadableSpan] = []
    reg = registry(spans)
    owner = PeerMesh(0, 2, runtime_dir, reg)
    owner._syncing = False
    ours, theirs = socket.socketpair()
    _adopt(owner, ours, 1)
    key = KEYS[0]
    unhashable = (BATCH, 2, (([1], 0, None, None, ()),), (), (), 0)  # marshal makes lists
    theirs.sendall(encode((COMMAND, 1, 0, key)) + encode((BATCH, 2, ((key, 1),)))
                   + encode(unhashable) + encode_command(stream(key)[0], stamp_ns=3))
    owner.pump()
    assert owner.apply_errors == 3
    assert key in reg and owner.counters()["received"] == 2  # one of them failed
    ours.close()
    theirs.close()


class _CountedPoller:
    """The mesh's ``poll`` object, counting the calls (one per drain pass); ``on_quiet`` runs
    once, right after the first poll that found nothing: a peer's write that lands as a
    drain's quiet pass begins, unread by it."""

    def __init__(self, poller: Any, on_quiet: Callable[[], None] | None = None) -> None:
        self._poller = poller
        self._on_quiet = on_quiet
        self.calls = 0

    def poll(self, timeout: float) -> Any:
        self.calls += 1
        ready = self._poller.poll(timeout)
        if not ready and self._on_quiet is not None:
            on_quiet, self._on_quiet = self._on_quiet, None
            on_quiet()
        return ready

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)


def _recording_owner(runtime_dir: str, *, yield_first: bool = False,
                     ) -> tuple[PeerMesh, list[str], list[Callable[[], None]],
                                list[Callable[[], None]]]:
    """Worker 0 of 2, serving, draining per read, with no peer started: the mesh, the span
    names its registry applied in order, and the read hooks. ``yield_first``: the first apply
    yields, as Resource.create once did."""
    reg = registry([])
    applied: list[str] = []
    first = [yield_first]

    def apply(command):  # type: ignore[no-untyped-def]
        if first[0]:
            first[0] = False
            gevent.sleep(0.01)
        op = command.ops[0]
        applied.append(op[1] if len(op) > 1 else "*")
        return reg.apply(command)

    owner = PeerMesh(0, 2, runtime_dir, _Watched(reg, apply))
    owner._syncing = False
    before: list[Callable[[], None]] = []
    after: list[Callable[[], None]] = []
    owner.drain_per_read(before, after)
    return owner, applied, before, after


def test_a_read_drains_only_once_a_peer_has_written_since_the_last_drain(
    cluster: Callable[..., list[Node]],
) -> None:
    """A read's drain found nothing to read almost every time with one busy connection per
    worker: the write counts tell a worker so without a ``poll`` (write_counts.py)."""
    nodes = cluster(2, tick=3600)
    mesh = nodes[0].mesh
    before: list[Callable[[], None]] = []
    after: list[Callable[[], None]] = []
    mesh.drain_per_read(before, after)
    poller = _CountedPoller(mesh._poller)
    mesh._poller = poller  # type: ignore[assignment]
    mine, theirs = KEYS[:2]
    commands = stream(mine)
    _read(mesh, before, after, commands[:1])
    _read(mesh, before, after, commands[1:2])
    assert poller.calls == 0  # worker 1 wrote nothing since the drain at start-up
    take(nodes[1], [theirs])  # worker 1 announces a session: a write to worker 0
    _read(mesh, before, after, [stream(theirs)[1]])
    assert poller.calls >= 1
    assert theirs not in nodes[0].reg  # it learned the owner first, and forwarded
    calls = poller.calls
    _read(mesh, before, after, commands[2:3])
    assert poller.calls == calls  # nothing new again
    settle(nodes)
    assert nodes[1].mesh.counters()["received"] == 1 and theirs in nodes[1].reg


def test_a_read_waits_for_a_drain_in_progress_even_when_nothing_new_was_written(
    runtime_dir: str,
) -> None:
    """The drain another greenlet began may hold a predecessor of this read's event, taken
    from its link and not yet applied: the read must wait for it, counts or not."""
    from spoe_agent.workers.router import encode_command

    commands = stream(KEYS[0])
    owner, applied, before, after = _recording_owner(runtime_dir, yield_first=True)
    owner.pump()  # nothing written yet: the counts are now known
    ours, peer = socket.socketpair()
    _adopt(owner, ours, 1)
    peer.sendall(encode_command(commands[0]))  # not counted: as if before the last drain
    draining = gevent.spawn(owner.pump)
    gevent.sleep(0)  # the drain took the event and is inside its apply
    _read(owner, before, after, commands[1:2])  # its successor, on a connection of ours
    draining.join()
    assert applied[:2] == ["root", "child"]
    ours.close()
    peer.close()


def test_a_session_that_ends_is_told_with_the_next_write_not_in_one_of_its_own(
    cluster: Callable[..., list[Node]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the sessions a read opened must reach the peers before its ACKs: with one busy
    connection, writing each end on its own was a second write per request."""
    nodes = cluster(2, tick=3600)
    mesh = nodes[0].mesh
    before: list[Callable[[], None]] = []
    after: list[Callable[[], None]] = []
    mesh.drain_per_read(before, after)
    key, other = KEYS[:2]
    commands = stream(key)
    _read(mesh, before, after, commands[:1])
    settle(nodes)
    assert nodes[1].mesh.peer_sessions == 1
    writes = _count_writes(monkeypatch)
    for command in commands[1:]:
        _read(mesh, before, after, [command])
    assert key not in nodes[0].reg  # the last event ended it
    assert writes == Counter()  # and nothing was written for that alone
    _read(mesh, before, after, stream(other)[:1])
    assert writes == Counter({1: 1})  # the next session opened: one write tells both
    nodes[1].mesh.pump()  # worker 1 reads that write, and worker 0 sends nothing more
    assert nodes[1].mesh.owner(key) == 1 and nodes[1].mesh.owner(other) == 0
    settle(nodes)
    assert nodes[1].mesh.peer_sessions == 1
    assert nodes[1].mesh.owner(key) == 1 and nodes[1].mesh.owner(other) == 0


def test_a_write_counted_while_a_drain_ran_makes_the_next_read_drain(runtime_dir: str) -> None:
    """The counts a drain compares against are read before its first pass: a write the drain
    missed was counted after that, so the next read drains and finds it before it routes the
    stream's next event."""
    from spoe_agent.workers.router import encode_command
    from spoe_agent.workers.write_counts import WriteCounts

    commands = stream(KEYS[0])
    owner, applied, before, after = _recording_owner(runtime_dir)
    ours, peer = socket.socketpair()
    _adopt(owner, ours, 1)
    owner.pump()
    peer_counts = WriteCounts(runtime_dir, 2, 1)

    def peer_writes() -> None:  # worker 1 forwards the stream's first event, as it should
        peer.sendall(encode_command(commands[0]))
        peer_counts.wrote(0)

    owner._poller = _CountedPoller(owner._poller, peer_writes)  # type: ignore[assignment]
    owner.pump()  # a drain (the tick's, say) that the write just misses
    assert applied == []
    _read(owner, before, after, commands[1:2])  # the event's successor reaches this worker
    assert applied[:2] == ["root", "child"]
    ours.close()
    peer.close()
