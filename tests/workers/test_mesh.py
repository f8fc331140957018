"""The gevent shell of routing: real unix sockets between meshes living in this process.

Each mesh plays one worker with its own registry; the streams' events are routed through
different meshes, as HAProxy spreads them over the workers' connections, and the union of what
the registries emitted must be the single-process result.
"""

from __future__ import annotations

import shutil
import tempfile
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
from spoe_agent.workers.mesh import PeerMesh, _Link, peer_path
from spoe_agent.workers.router import (
    BATCH,
    COMMAND,
    HELLO,
    SYNC,
    FrameReader,
    encode,
    owner_of,
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
            mesh = PeerMesh(index, n, runtime_dir, reg.apply, **kwargs)  # type: ignore[arg-type]
            nodes.append(Node(mesh, reg, spans))
        with gevent.Timeout(10):
            gevent.joinall([gevent.spawn(node.mesh.start) for node in nodes], raise_error=True)
        made.extend(nodes)
        return nodes

    yield start
    for node in made:
        node.mesh.stop()


def settle(nodes: list[Node]) -> None:
    """What a tick would do: every owner drains and applies what is waiting for it."""
    gevent.sleep(0)
    for node in nodes:
        node.mesh.pump()


def owned(workers: int, owner: int, count: int) -> list[str]:
    return [k for k in KEYS if owner_of(k, workers) == owner][:count]


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
        paths = {s.attributes["http.path"] for s in node.spans if s.name == "root"}
        assert paths == {f"/{k}" for k in keys if owner_of(k, 3) == index}
        assert len(node.reg) == 0
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
    (key,) = owned(2, 0, 1)
    for command in stream(key):
        nodes[0].mesh.route(command)
    assert shapes(nodes[0].spans) == Counter({expected_shape(key): 1})
    assert nodes[0].mesh.counters()["forwarded"] == 0
    assert nodes[1].mesh.counters()["received"] == 0


@pytest.mark.parametrize("drains_per_read", [False, True])
def test_a_local_command_drains_first_unless_the_server_drains_per_read(
    cluster: Callable[..., list[Node]], drains_per_read: bool,
) -> None:
    nodes = cluster(2)
    forwarded, local = owned(2, 0, 2)
    nodes[1].mesh.route(stream(forwarded)[0])  # waits in worker 0's bulk link, unwatched
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


def test_a_reads_forwards_are_written_once_per_owner_before_its_acks(
    cluster: Callable[..., list[Node]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    nodes = cluster(3)
    mesh = nodes[0].mesh
    before: list[Callable[[], None]] = []
    after: list[Callable[[], None]] = []
    mesh.drain_per_read(before, after)
    keys = {owner: owned(3, owner, 3) for owner in (1, 2)}
    writes: Counter[int | None] = Counter()
    send = _Link.send

    def counted(link: _Link, data: bytes) -> int:
        writes[link.peer] += 1
        return send(link, data)

    monkeypatch.setattr(_Link, "send", counted)
    seen: list[int] = []
    after.insert(0, lambda: seen.append(nodes[1].mesh.counters()["received"]))
    commands = [stream(key)[step] for step in range(2) for ks in keys.values() for key in ks]
    assert _read(mesh, before, after, commands) == [[]] * len(commands)
    assert seen == [0]  # nothing was written while the read was handled
    assert writes == Counter({1: 1, 2: 1})  # then one frame per owner
    settle(nodes)
    for owner, owned_keys in keys.items():
        assert nodes[owner].mesh.counters()["received"] == 6
        assert all(key in nodes[owner].reg for key in owned_keys)
    assert mesh.counters()["forwarded"] == 12
    for owner, owned_keys in keys.items():  # the rest of each stream, one read per event
        for step in (2, 3):
            _read(mesh, before, after, [stream(key)[step] for key in owned_keys])
        settle(nodes)
        assert shapes(nodes[owner].spans) == Counter(
            {expected_shape(key): 1 for key in owned_keys})


def test_a_workers_own_commands_can_wait_for_their_acks(
    cluster: Callable[..., list[Node]],
) -> None:
    """``keep_own``: the commands other workers own join the read's batch (written before its
    ACKs), this worker's own are applied after the read, as the server's deferred work is;
    with every event through the other worker than the last, the traces are those of one
    process."""
    nodes = cluster(2)
    hooks = []
    for node in nodes:
        before: list[Callable[[], None]] = []
        after: list[Callable[[], None]] = []
        node.mesh.drain_per_read(before, after)
        hooks.append((before, after))
    keys = owned(2, 0, 3) + owned(2, 1, 3)
    for step in range(4):
        for n, key in enumerate(keys):
            index = (n + step) % 2
            node = nodes[index]
            before, after = hooks[index]
            for hook in before:
                hook()
            command = stream(key)[step]
            own = node.mesh.keep_own([command])
            assert own == ([command] if owner_of(key, 2) == index else [])
            if step == 0 and own:
                assert key not in node.reg  # the caller applies it, after the ACK
            for hook in after:
                hook()
            for mine in own:  # the deferred work, before the next read
                node.reg.apply(mine)
    settle(nodes)
    for index, node in enumerate(nodes):
        assert shapes(node.spans) == Counter(
            {expected_shape(key): 1 for key in keys if owner_of(key, 2) == index})
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
    (key,) = owned(2, 1, 1)
    commands = stream(key, inject=True)
    results = _read(mesh, before, after, commands)
    (var,) = results[2]
    settle(nodes)
    assert shapes(nodes[1].spans) == Counter({expected_shape(key): 1})
    (nxt,) = [s for s in nodes[1].spans if s.name == "next"]
    assert var.value.split("-")[2] == f"{nxt.context.span_id:016x}"


def test_a_message_seen_without_inject_is_not_searched_again(
    cluster: Callable[..., list[Node]],
) -> None:
    nodes = cluster(2)
    mesh = nodes[0].mesh
    (remote,) = owned(2, 1, 1)
    (local,) = owned(2, 0, 1)
    plain = Message("m", [("id", remote), ("span", "x")])
    assert not mesh.waits_for_owner([plain])
    # Remembered: the same name with as many arguments is not searched (were it an inject,
    # it would be handled inline: its read waits for the owner, the trace is the same).
    assert not mesh.waits_for_owner([Message("m", [("id", remote), ("inject", "x")])])
    # The same name with other arguments (HAProxy's configuration changed) is searched.
    assert mesh.waits_for_owner([Message("m", [("id", remote), ("span", "x"), ("inject", "x")])])
    assert mesh.waits_for_owner([plain, Message("n", [("id", remote), ("inject", "x")])])
    assert not mesh.waits_for_owner([Message("n", [("id", local), ("inject", "x")])])


def test_commands_for_a_restarting_owner_are_held_and_replayed_in_order(
    cluster: Callable[..., list[Node]],
) -> None:
    (first,) = cluster(2, only=[0])  # worker 1 is down (not started yet, or restarting)
    keys = owned(2, 1, 20)
    for key in keys:
        for command in stream(key, inject=True)[:3]:
            assert first.mesh.route(command) == []  # the inject cannot be answered
    held = first.mesh.counters()
    assert held["held"] == 3 * len(keys)
    assert held["inject_unavailable"] == len(keys)
    assert held["forwarded"] == 0

    (second,) = cluster(2, only=[1])  # the replacement: it syncs before serving
    for key in keys:
        first.mesh.route(stream(key)[3])
    settle([first, second])
    assert shapes(second.spans) == Counter({expected_shape(key): 1 for key in keys})
    assert first.mesh.counters()["held_dropped"] == 0


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
                    back.sendall(encode((HELLO, 1, False, False)) + encode((SYNC,)))
                    conns.append(back)

    conns: list[socket.socket] = []

    servers: list[gevent.Greenlet] = []

    def accept() -> None:
        while True:
            conn, _ = silent.accept()
            conns.append(conn)
            servers.append(gevent.spawn(serve, conn))

    acceptor = gevent.spawn(accept)
    try:
        (node,) = cluster(2, only=[0], rpc_timeout=0.05)
        (key,) = owned(2, 1, 1)
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
    keys = owned(2, 1, 150)
    big = "x" * 3000
    sent = 0
    with gevent.Timeout(10):
        for key in keys:
            first = stream(key)[0]
            padded = first._replace(ops=first.ops + tuple((4, f"pad{i}", big) for i in range(10)))
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
    first, second = owned(2, 1, 2)
    for command in stream(first, inject=True):  # opens the urgent link
        nodes[0].mesh.route(command)
    settle(nodes)
    bulk = nodes[0].mesh._bulk[1]
    assert bulk is not None
    bulk.close()  # as when a link drops: the next command opens a new one
    commands = stream(second, inject=True)
    nodes[0].mesh.route(commands[0])
    nodes[0].mesh.route(commands[1])  # both now wait in a connection not yet accepted
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

    owner = PeerMesh(0, 3, runtime_dir, apply)
    owner._syncing = False
    key, other = owned(3, 0, 2)
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
    first, second = owned(3, 0, 2)
    a, b = stream(first), stream(second)

    def apply(command):  # type: ignore[no-untyped-def]
        op = command.ops[0]
        applied.append((command.key, op[1] if len(op) > 1 else "*"))
        if len(applied) == 1:
            gevent.sleep(0.01)  # as Resource.create does
        return reg.apply(command)

    owner = PeerMesh(0, 3, runtime_dir, apply)
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
    owner = PeerMesh(0, 2, runtime_dir, reg.apply)
    owner._syncing = False
    ours, theirs = socket.socketpair()
    _adopt(owner, ours, 1)
    (key,) = owned(2, 0, 1)
    theirs.sendall(encode((COMMAND, 1, 0, key)) + encode((BATCH, 2, ((key, 1),)))
                   + encode_command(stream(key)[0], stamp_ns=3))
    owner.pump()
    assert owner.apply_errors == 2
    assert key in reg and owner.counters()["received"] == 1
    ours.close()
    theirs.close()
