"""The per-connection SPOP state machine, sans-IO in the style of h11.

Bytes go in through :meth:`SpopConnection.receive_data`, events come out, and everything the
agent must write accumulates in one outbound buffer drained by :meth:`data_to_send`. Whole
frames are appended atomically, so concurrent handlers can never interleave partial writes
(the coraza-spoa #217 failure mode), and the socket shell (``server.py``) only reads, feeds,
runs handlers and writes: its bounds and timers are I/O policy, none of them protocol.

No input can raise out of this class: every protocol error becomes an AGENT-DISCONNECT with the
status code from SPOE.txt's table, a :class:`ProtocolViolation` event and the CLOSED state.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

from spoe_agent.protocol import codec
from spoe_agent.protocol.errors import FrameTooBig, InvalidFrame, ProtocolError
from spoe_agent.protocol.types import (
    FLAG_ABORT,
    FLAG_FIN,
    STATUS_MESSAGES,
    Action,
    DataType,
    FrameType,
    Message,
    Scope,
    SetVar,
    Status,
    Typed,
    UnsetVar,
)
from spoe_agent.protocol.varint import decode_varint

log = logging.getLogger(__name__)

MIN_FRAME_SIZE = 256
DEFAULT_MAX_FRAME_SIZE = 65532
DEFAULT_CAPABILITIES = ("pipelining", "async", "fragmentation")
_MAX_DISCONNECT_MESSAGE: Final = 255  # HAProxy 2.6 treats a longer message as an invalid frame
_LENGTH_PREFIX: Final = 4
# An ACK stays a byte under the negotiated size: HAProxy 3.2 takes one of exactly that size
# (16,380 bytes under its default max-frame-size) and never hands it on, and every later ACK
# on the connection then waits behind it: the requests fail after "timeout processing" until
# HAProxy restarts (black-box run; 2.6 takes it). One byte less than allowed costs nothing.
_ACK_MARGIN: Final = 1


class State(Enum):
    AWAIT_HELLO = "await-hello"
    READY = "ready"
    CLOSED = "closed"


# Module-level aliases for the per-frame paths: reading an Enum member off its class costs
# ~100 ns on CPython 3.11 (a global, ~15 ns), and a traced request reads a dozen of them.
_READY: Final = State.READY
_CLOSED: Final = State.CLOSED
_NOTIFY: Final = int(FrameType.NOTIFY)
_UNSET: Final = int(FrameType.UNSET)
_FIN_ONLY: Final = FLAG_FIN.to_bytes(4, "big")
_U32_FROM: Final = struct.Struct(">I").unpack_from


def _encodes(action: Any) -> bool:
    try:
        codec.encode_actions([action])
    except (TypeError, ValueError, OverflowError, AttributeError, UnicodeError):
        return False
    return True


def _describe(action: Any) -> str:
    """``set-var(txn.name) of float``: what an operator greps the handler code for."""
    name = getattr(action, "name", None)
    scope: Any = getattr(action, "scope", None)
    try:
        where = f"{Scope(scope).name.lower()}.{name}"
    except (ValueError, TypeError):
        where = f"scope {scope!r}, {name!r}"
    if isinstance(action, SetVar):
        return f"set-var({where}) of {type(action.value).__name__}"
    if isinstance(action, UnsetVar):
        return f"unset-var({where})"
    return f"the action {type(action).__name__}"


@dataclass(slots=True)
class HelloReceived:
    """HAProxy's HELLO was accepted and answered; ``healthcheck`` connections close right after."""

    max_frame_size: int
    capabilities: frozenset[str]
    engine_id: str | None
    healthcheck: bool
    negotiated_frame_size: int


@dataclass(slots=True)
class NotifyReceived:
    """A complete NOTIFY (reassembled if it was fragmented); it must get exactly one ACK.

    ``acked``: its empty ACK is already queued (``SpopConnection.empty_ack``); it must not be
    ACKed again.
    """

    stream_id: int
    frame_id: int
    messages: list[Message]
    acked: bool = False


@dataclass(slots=True)
class NotifyAborted:
    """HAProxy gave up on a fragmented NOTIFY (UNSET with FIN|ABORT): no ACK is due."""

    stream_id: int
    frame_id: int


@dataclass(slots=True)
class DisconnectReceived:
    """HAProxy said goodbye; our AGENT-DISCONNECT reply is queued, after the ACKs still owed.

    ``status`` is -1 when the frame carried none (HAProxy always sends one); ``message`` is
    cut to the 255 characters SPOE.txt allows it, since it goes to the log."""

    status: int
    message: str


@dataclass(slots=True)
class ProtocolViolation:
    """The peer broke the protocol; the state is CLOSED and AGENT-DISCONNECT(status) is queued,
    after the ACKs still owed to the NOTIFYs decoded before the bad frame, in this read or an
    earlier one (:meth:`SpopConnection.release_goodbye` gives up on those)."""

    status: Status
    message: str


@dataclass(slots=True)
class ConnectionClosed:
    """Nothing more will be accepted: flush :meth:`SpopConnection.data_to_send`, then close.

    ``unfinished``: bytes the peer's close cut off, of a frame or of a fragmented NOTIFY
    whose last fragment never came (lost events HAProxy will not send again).
    """

    reason: str = ""
    unfinished: int = 0


Event = (
    HelloReceived | NotifyReceived | NotifyAborted | DisconnectReceived | ProtocolViolation
    | ConnectionClosed
)


@dataclass(slots=True)
class _Fragments:
    stream_id: int
    frame_id: int
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0  # payload bytes
    held: int = 0  # what reassembly's bound counts: payload and each fragment's cost


class SpopConnection:
    """One HAProxy connection's protocol state.

    ``max_frame_size`` is the largest frame the agent accepts and announces (the negotiated
    size is the minimum of it and HAProxy's); ``max_reassembled_size`` bounds the memory one
    fragmented NOTIFY may take.

    ``empty_ack``, when given, is asked about each NOTIFY's payload once it has decoded: true
    means the application's ACK for it will be empty whatever its messages say, and the ACK is
    queued there and then, so that the caller can write it before the application applies the
    messages. Through HAProxy, every microsecond by which an ACK leaves sooner takes ~2.5 off
    the request's median (benchmarks/README.md). Only the NOTIFYs that lead a read are ACKed
    so, which keeps the ACKs in the order of their NOTIFYs, and only once they decoded: a
    malformed one still gets no ACK, only the AGENT-DISCONNECT.
    """

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        capabilities: tuple[str, ...] = DEFAULT_CAPABILITIES,
        max_reassembled_size: int = 1 << 20,
        on_trimmed_ack: Callable[[str], None] | None = None,
        empty_ack: Callable[[bytes], bool] | None = None,
    ) -> None:
        if max_frame_size < MIN_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be at least {MIN_FRAME_SIZE}")
        self.state = State.AWAIT_HELLO
        self.max_frame_size = max_frame_size
        self.capabilities = tuple(capabilities)
        self.max_reassembled_size = max_reassembled_size
        self.frame_size = max_frame_size  # becomes the negotiated size after HELLO
        self.peer_capabilities: frozenset[str] = frozenset()
        self.engine_id: str | None = None
        self.healthcheck = False
        self.acks_too_big = 0
        self.actions_unencodable = 0
        #: Told why each time an ACK goes out without some of its actions ("too_big" or
        #: "unencodable"), so that the owner of the counters (the server's metrics) sees it.
        self.on_trimmed_ack = on_trimmed_ack
        # The peer's EOF ended a working connection (no DISCONNECT either way): the NOTIFYs
        # it sent before still get their ACKs, which a half-closed peer can read.
        self.peer_eof = False
        self.empty_ack = empty_ack
        #: The status of the AGENT-DISCONNECT queued, once one is: each connection sends one at
        #: most, whoever started the goodbye (a limit, a protocol error, or HAProxy's own).
        self.disconnect_status: int | None = None
        #: The last :meth:`receive_data` began a frame it could not finish, or finished a
        #: fragment with the next one due: the shell's frame deadline starts again. (Before the
        #: HELLO it never does: that deadline runs from the accept, however many frames of
        #: other kinds a peer dribbles first.)
        self.began_frame = False
        # A protocol error's AGENT-DISCONNECT waits here while NOTIFYs decoded before the bad
        # frame still owe their ACKs (``_unanswered``: those of the same read, and those of
        # earlier reads whose concurrent handlers still run, such as an inject waiting for
        # another worker): the spec wants every NOTIFY ACKed, and HAProxy would otherwise fail
        # streams whose events were handled. The shell releases it once the read is handled
        # and its handlers joined, within a bound, in any case.
        self._goodbye: tuple[int, str] | None = None
        self._unanswered = 0  # NOTIFYs decoded whose ACK is not queued yet
        self._inbuf = bytearray()
        self._out: list[bytes] = []
        self._fragments: _Fragments | None = None

    # ---------------------------------------------------------------------- moving it

    def export_state(self) -> dict[str, Any] | None:
        """What another process needs to go on serving this connection, or None if it cannot
        be moved now: only a READY connection at a frame boundary, with no fragmented NOTIFY
        half reassembled and nothing left to write, moves (HAProxy then sees nothing happen).
        Plain data, for any serializer.
        """
        if not self.at_frame_boundary or self._out:
            return None
        return {
            "frame_size": self.frame_size,
            "capabilities": sorted(self.peer_capabilities),
            "engine_id": self.engine_id,
        }

    @classmethod
    def resumed(cls, state: Any, **kwargs: Any) -> SpopConnection:
        """A READY connection that goes on from :meth:`export_state` (``kwargs`` as for the
        constructor: this process's own limits). Raises ValueError for a state that is not
        (``Any``: it comes from another process, and this module may be compiled, where a
        ``dict`` annotation would raise TypeError on anything else)."""
        conn = cls(**kwargs)
        if type(state) is not dict:
            raise ValueError(f"not a connection state: {state!r:.200}")
        try:
            frame_size = state["frame_size"]
            capabilities = state["capabilities"]
            engine_id = state["engine_id"]
        except (KeyError, TypeError):
            raise ValueError("not a connection state") from None
        if (type(frame_size) is not int or not MIN_FRAME_SIZE <= frame_size <= conn.max_frame_size
                or not isinstance(capabilities, list)
                or not all(isinstance(c, str) for c in capabilities)
                or not (engine_id is None or isinstance(engine_id, str))):
            raise ValueError(f"not a connection state: {state!r:.200}")
        conn.frame_size = frame_size
        conn.peer_capabilities = frozenset(capabilities)
        conn.engine_id = engine_id
        conn.state = _READY
        return conn

    # ------------------------------------------------------------------------- output side

    def data_to_send(self) -> bytes:
        """Drain everything queued for the peer (whole frames only)."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def send_ack(self, stream_id: int, frame_id: int, actions: list[Action] | None = None) -> None:
        """Queue the one ACK a NOTIFY is owed.

        An ACK must fit the negotiated frame size and cannot be fragmented; when the actions do
        not fit, HAProxy gets the longest leading run of them that does (the request goes on,
        the rest of the variables are not set) rather than a frame it would answer with "frame
        is too big". Leading: the first actions are the ones that matter most (an inject's
        ``traceparent`` comes before the baggage a client may have made huge).
        """
        if self.state is _CLOSED and not self.peer_eof and self._goodbye is None:
            return
        try:
            frame = codec.ack(stream_id, frame_id, actions)
        except (TypeError, ValueError, OverflowError, AttributeError, UnicodeError) as exc:
            # An application handler returned what SPOP cannot carry (a float, a scope out of
            # range): HAProxy still gets its ACK, with the actions that can be encoded, as it
            # would had the handler raised. Dropping the connection would fail every NOTIFY in
            # flight on it.
            assert actions is not None  # an ACK without actions always encodes
            encodable: list[Action] = []
            bad: Any = None
            for action in actions:  # each encoded once: kept, or the first one named below
                if _encodes(action):
                    encodable.append(action)
                elif bad is None:
                    bad = action
            actions = encodable
            self.actions_unencodable += 1
            # Named after the action, and rate-limited per variable: the handler is not known
            # here, its variable is, and one handler's bug must not hide another's.
            what = _describe(bad)
            log.error("ACK for stream %d frame %d: %s cannot be encoded (%s); sent with the %d "
                      "action(s) that can", stream_id, frame_id, what, exc, len(actions),
                      extra={"rate_key": f"unencodable {what}"})
            if self.on_trimmed_ack is not None:
                self.on_trimmed_ack("unencodable")
            frame = codec.ack(stream_id, frame_id, actions)
        if actions and len(frame) - _LENGTH_PREFIX > self.frame_size - _ACK_MARGIN:
            self.acks_too_big += 1
            if self.on_trimmed_ack is not None:
                self.on_trimmed_ack("too_big")
            size = len(frame) - _LENGTH_PREFIX
            # The leading actions that fit, from each one's size: an ACK is its header then its
            # actions end to end. Re-encoding after each action dropped was quadratic: a peer's
            # NOTIFY of 6,000 injects froze the agent for 14 s (black-box run).
            room = (self.frame_size - _ACK_MARGIN
                    - (len(codec.ack(stream_id, frame_id)) - _LENGTH_PREFIX))
            kept = 0
            for action in actions:
                room -= len(codec.encode_actions([action]))
                if room < 0:
                    break
                kept += 1
            frame = codec.ack(stream_id, frame_id, actions[:kept])
            log.warning(
                "ACK for stream %d frame %d is %d bytes, over the negotiated %d (less the byte "
                "HAProxy 3.2 needs): sent with %d of its %d actions", stream_id, frame_id, size,
                self.frame_size, kept,
                len(actions),
            )
        self._out.append(frame)
        if self._unanswered:
            self._unanswered -= 1
        if self._goodbye is not None and not self._unanswered:
            self.release_goodbye()

    @property
    def goodbye_pending(self) -> bool:
        """A protocol error's AGENT-DISCONNECT waits for ACKs still owed (see release_goodbye)."""
        return self._goodbye is not None

    def release_goodbye(self) -> None:
        """Queue a protocol error's AGENT-DISCONNECT now, whatever ACKs are still owed: the
        shell calls it once it has handled the read that ended with the bad frame (a handler
        still running then loses its ACK, as it would have without the wait). ACKs are refused
        after it."""
        goodbye = self._goodbye
        if goodbye is not None:
            self._goodbye = None
            self._queue_disconnect(goodbye[0], goodbye[1])

    def close(self, status: Status = Status.NORMAL, message: str | None = None) -> None:
        """Start an agent-side disconnect (shutdown, limits): AGENT-DISCONNECT then close."""
        if self.state is State.CLOSED:
            return
        self._queue_disconnect(status, message)
        self.state = State.CLOSED

    def _queue_disconnect(self, status: int, message: str | None) -> None:
        if message is None:
            message = STATUS_MESSAGES.get(status, "error")  # type: ignore[call-overload]
        raw = message.encode("utf-8", "replace")[:_MAX_DISCONNECT_MESSAGE]
        text = raw.decode("utf-8", "ignore")
        self.disconnect_status = int(status)
        self._out.append(codec.disconnect(FrameType.AGENT_DISCONNECT, int(status), text))

    # -------------------------------------------------------------------------- input side

    def receive_eof(self) -> list[Event]:
        """The peer closed (EOF or reset): a normal end, whatever state we were in."""
        if self.state is State.CLOSED:
            return []
        self.peer_eof = self.state is State.READY
        self.state = State.CLOSED
        self.began_frame = False
        fragments = self._fragments
        unfinished = len(self._inbuf) + (fragments.size if fragments is not None else 0)
        if unfinished:
            return [ConnectionClosed("peer closed the connection in the middle of a frame",
                                     unfinished)]
        return [ConnectionClosed("peer closed the connection")]

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the socket; return the events the complete frames produced.

        Frames are read straight from ``data`` (bytes: a slice is one copy); only a frame cut
        by the end of a read waits in the bytearray, and is joined to what follows once it is
        complete, so a peer dribbling a frame byte by byte costs no quadratic copying.
        """
        self.began_frame = False
        if self.state is _CLOSED:
            return []
        if type(data) is not bytes:  # a bytearray or memoryview: slices must be hashable
            data = bytes(data)
        buf = self._inbuf
        if buf:
            buf += data
            if not self._frame_complete(buf):
                return []  # more of the same frame: its deadline stands
            data = bytes(buf)
            buf.clear()
        events: list[Event] = []
        pos = 0
        end = len(data)
        unpack_length = _U32_FROM
        early = self.empty_ack  # None once a frame of this read is not ACKed early
        try:
            while end - pos >= _LENGTH_PREFIX and self.state is not _CLOSED:
                length = unpack_length(data, pos)[0]
                if length > self.frame_size:
                    raise FrameTooBig(
                        f"frame of {length} bytes exceeds the max-frame-size of {self.frame_size}"
                    )
                frame_end = pos + _LENGTH_PREFIX + length
                if frame_end > end:
                    break
                # The common frame, inlined: an unfragmented NOTIFY. Anything else (and any
                # doubt: ids running past the frame) takes the general path, which decides the
                # same way.
                if (
                    length >= 7
                    and data[pos + 4] == _NOTIFY
                    and data[pos + 5:pos + 9] == _FIN_ONLY
                    and self.state is _READY
                    and self._fragments is None
                ):
                    # A malformed or truncated id leaves ``at`` past the frame, for the
                    # general path to raise the error.
                    sid = data[pos + 9]
                    at = pos + 10
                    if sid >= 240:
                        try:
                            sid, at = decode_varint(data, pos + 9)
                        except InvalidFrame:
                            at = frame_end + 1
                    fid = data[at] if at < frame_end else 240
                    if fid < 240:
                        at += 1
                    else:
                        try:
                            fid, at = decode_varint(data, at)
                        except InvalidFrame:
                            at = frame_end + 1
                    if at <= frame_end:
                        payload = data[at:frame_end]
                        messages = codec.decode_messages(payload)
                        if early is not None and early(payload):
                            self._out.append(codec.ack(sid, fid, None))
                            events.append(NotifyReceived(sid, fid, messages, True))
                        else:
                            early = None
                            events.append(NotifyReceived(sid, fid, messages))
                            self._unanswered += 1
                    else:
                        early = None
                        self._handle_frame(data[pos + _LENGTH_PREFIX:frame_end], events)
                else:
                    early = None
                    self._handle_frame(data[pos + _LENGTH_PREFIX:frame_end], events)
                pos = frame_end
        except ProtocolError as exc:
            self._violation(exc.status, exc.message, events)
        except Exception as exc:  # a bug of ours must cost one connection, not the process
            log.exception("unexpected error while decoding SPOP input")
            self._violation(Status.UNKNOWN, f"internal error: {type(exc).__name__}", events)
        if self.state is _READY:
            if pos < end:
                buf += memoryview(data)[pos:]
                self.began_frame = True
            elif self._fragments is not None:
                self.began_frame = True
        elif self.state is not _CLOSED and pos < end:
            buf += memoryview(data)[pos:]
        return events

    def _frame_complete(self, buf: bytearray) -> bool:
        """True once ``buf`` holds a whole frame, or a length prefix over the frame size (which
        ``receive_data`` then refuses without waiting for the rest)."""
        if len(buf) < _LENGTH_PREFIX:
            return False
        length = _U32_FROM(buf, 0)[0]
        return length > self.frame_size or len(buf) >= _LENGTH_PREFIX + length

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame still waiting (for read deadlines and memory limits)."""
        return len(self._inbuf)

    @property
    def at_frame_boundary(self) -> bool:
        """READY with no frame begun and no fragmented NOTIFY half reassembled: waiting for
        input here is idleness (``idle_timeout``), not a slow frame (``read_timeout``), and
        the connection could move to another process with nothing lost."""
        return self.state is _READY and not self._inbuf and self._fragments is None

    def _violation(self, status: Status, message: str, events: list[Event]) -> None:
        # The server logs it with the peer's address; this is for protocol debugging.
        log.debug("SPOP protocol error, disconnecting with status %d: %s", status, message)
        self._fragments = None
        if self._unanswered:
            self._goodbye = (int(status), message)
            self.disconnect_status = int(status)
        else:
            self._queue_disconnect(status, message)
        self.state = State.CLOSED
        events.append(ProtocolViolation(status, message))
        events.append(ConnectionClosed(message))

    def _handle_frame(self, body: bytes, events: list[Event]) -> None:
        frame = codec.decode_frame(body)
        ftype = frame.type
        if self.state is _READY:
            if ftype == _NOTIFY or ftype == _UNSET:
                self._handle_notify(frame, events)
                return
            if ftype == FrameType.HAPROXY_DISCONNECT:
                self._handle_disconnect(frame, events)
                return
            if ftype == FrameType.HAPROXY_HELLO:
                raise InvalidFrame("HAPROXY-HELLO received twice")
        else:  # AWAIT_HELLO
            if ftype == FrameType.HAPROXY_HELLO:
                self._handle_hello(frame, events)
                return
            if ftype == FrameType.HAPROXY_DISCONNECT:
                self._handle_disconnect(frame, events)
                return
            if ftype == FrameType.NOTIFY:
                raise InvalidFrame("NOTIFY received before HAPROXY-HELLO")
            if ftype == FrameType.UNSET:
                raise InvalidFrame("a NOTIFY's fragment (frame type 0) received before HAPROXY-HELLO")
        if ftype in (FrameType.AGENT_HELLO, FrameType.AGENT_DISCONNECT, FrameType.ACK):
            raise InvalidFrame(f"agent frame type {ftype} received from HAProxy")
        # Unknown frame types are skipped, as HAProxy itself does.
        log.debug("skipping frame of unknown type %d", ftype)

    def _handle_hello(self, frame: codec.Frame, events: list[Event]) -> None:
        if not frame.flags & FLAG_FIN:
            raise ProtocolError("fragmented HAPROXY-HELLO", Status.FRAGMENTATION_NOT_SUPPORTED)
        if frame.stream_id or frame.frame_id:
            raise InvalidFrame("HAPROXY-HELLO must carry stream-id 0 and frame-id 0")
        items = codec.decode_kv_list(frame.payload)
        # A value there but of the wrong type is an invalid frame, as HAProxy judges an
        # AGENT-HELLO; status 5, 6 or 7 means the value is missing.
        versions = items.get("supported-versions")
        if versions is None:
            raise ProtocolError("supported-versions not found in HAPROXY-HELLO", Status.NO_VERSION)
        if not isinstance(versions, str):
            raise InvalidFrame("supported-versions must be a string")
        if not _supports_v2(versions):
            raise ProtocolError(
                f"no supported version in {versions[:64]!r}: this agent speaks SPOP 2.0",
                Status.UNSUPPORTED_VERSION,
            )
        peer_size = items.get("max-frame-size")
        if peer_size is None:
            raise ProtocolError("max-frame-size not found in HAPROXY-HELLO", Status.NO_MAX_FRAME_SIZE)
        if type(peer_size) is not int:
            raise InvalidFrame("max-frame-size must be an integer")
        if peer_size < MIN_FRAME_SIZE:
            raise ProtocolError(
                f"max-frame-size {peer_size} is below the minimum of {MIN_FRAME_SIZE}",
                Status.BAD_MAX_FRAME_SIZE,
            )
        caps = items.get("capabilities")
        if caps is None:
            raise ProtocolError("capabilities not found in HAPROXY-HELLO", Status.NO_CAPABILITIES)
        if not isinstance(caps, str):
            raise InvalidFrame("capabilities must be a string")
        self.peer_capabilities = frozenset(c.strip() for c in caps.split(",") if c.strip())
        engine_id = items.get("engine-id")
        self.engine_id = engine_id if isinstance(engine_id, str) else None
        self.healthcheck = items.get("healthcheck") is True
        self.frame_size = min(self.max_frame_size, peer_size)
        payload = codec.encode_kv_list([
            ("version", "2.0"),
            ("max-frame-size", Typed(DataType.UINT32, self.frame_size)),
            ("capabilities", ",".join(self.capabilities)),
        ])
        self._out.append(codec.encode_frame(FrameType.AGENT_HELLO, 0, 0, payload))
        events.append(HelloReceived(
            peer_size, self.peer_capabilities, self.engine_id, self.healthcheck, self.frame_size,
        ))
        if self.healthcheck:
            self.state = State.CLOSED
            events.append(ConnectionClosed("health check answered"))
        else:
            self.state = State.READY

    def _handle_disconnect(self, frame: codec.Frame, events: list[Event]) -> None:
        try:
            items = codec.decode_kv_list(frame.payload)
        except InvalidFrame:
            items = {}
        status = items.get("status-code")
        message = items.get("message")
        status = status if type(status) is int else -1
        message = message[:_MAX_DISCONNECT_MESSAGE] if isinstance(message, str) else ""
        self._fragments = None
        if self._unanswered:
            # NOTIFYs decoded before it (in the same read, or with handlers still running)
            # are ACKed first, as after a protocol error: with --workers their ACKs are queued
            # after the read's frames are all decoded, and were refused, where one process had
            # already written its empty ones (black-box run).
            self._goodbye = (int(Status.NORMAL), STATUS_MESSAGES[Status.NORMAL])
            self.disconnect_status = int(Status.NORMAL)
        else:
            self._queue_disconnect(Status.NORMAL, None)
        self.state = State.CLOSED
        events.append(DisconnectReceived(status, message))
        events.append(ConnectionClosed(f"HAProxy disconnected (status {status}: {message})"))

    def _handle_notify(self, frame: codec.Frame, events: list[Event]) -> None:
        flags = frame.flags
        pending = self._fragments
        if frame.type == _NOTIFY:
            if pending is not None:
                raise ProtocolError(
                    "NOTIFY received while a fragmented NOTIFY is incomplete",
                    Status.INTERLACED_FRAMES,
                )
            if flags & FLAG_FIN:  # the common, unfragmented case (ABORT alone is ignored)
                events.append(NotifyReceived(
                    frame.stream_id, frame.frame_id, codec.decode_messages(frame.payload),
                ))
                self._unanswered += 1
                return
            if "fragmentation" not in self.capabilities:
                raise ProtocolError(
                    "fragmented NOTIFY but fragmentation was not announced",
                    Status.FRAGMENTATION_NOT_SUPPORTED,
                )
            pending = self._fragments = _Fragments(frame.stream_id, frame.frame_id)
            self._add_fragment(pending, frame.payload)
            return
        # UNSET: a continuation fragment, or HAProxy's abort.
        if pending is None:
            if flags & FLAG_ABORT:
                return  # abort of something already finished: nothing to do
            raise InvalidFrame("fragment received with no fragmented NOTIFY in progress")
        if (frame.stream_id, frame.frame_id) != (pending.stream_id, pending.frame_id):
            raise ProtocolError(
                f"fragment for stream {frame.stream_id} frame {frame.frame_id} interleaved with "
                f"stream {pending.stream_id} frame {pending.frame_id}",
                Status.INTERLACED_FRAMES,
            )
        if flags & FLAG_ABORT:
            self._fragments = None
            events.append(NotifyAborted(pending.stream_id, pending.frame_id))
            return
        self._add_fragment(pending, frame.payload)
        if flags & FLAG_FIN:
            self._fragments = None
            payload = b"".join(pending.chunks)
            events.append(NotifyReceived(
                pending.stream_id, pending.frame_id, codec.decode_messages(payload),
            ))
            self._unanswered += 1

    def _add_fragment(self, pending: _Fragments, payload: bytes) -> None:
        # Each fragment also costs what holds it (a bytes object and a list slot): counted by
        # payload bytes alone, 17 million empty fragments held 140 MB, and 2-byte ones 28 MB
        # against a 1 MiB bound (black-box run). HAProxy's fragments are frame-sized.
        pending.size += len(payload)
        pending.held += len(payload) + _FRAGMENT_COST
        if pending.held > self.max_reassembled_size:
            raise FrameTooBig(
                f"fragmented NOTIFY exceeds {self.max_reassembled_size} bytes once reassembled "
                f"(each fragment counting {_FRAGMENT_COST} more)"
            )
        if payload:
            pending.chunks.append(payload)


#: What a fragment costs beyond its payload, in reassembly's bound (a bytes object's header,
#: its list slot, rounded up).
_FRAGMENT_COST: Final = 64


def _supports_v2(versions: str) -> bool:
    """True if HAProxy announced a major version >= 2 ("2.0" in every release since 1.8.10),
    written "Major.Minor" as the specification has it ("2" or "2.x" are not versions).

    ASCII digits only, and a bounded count: ``str.isdigit`` is true of "²" or "٢", which
    ``int`` rejects or reads as another number, and ``int`` refuses over 4,300 digits.
    """
    for item in versions.split(","):
        major, dot, minor = item.strip().partition(".")
        if dot and _version_part(major) and _version_part(minor) and int(major) >= 2:
            return True
    return False


def _version_part(text: str) -> bool:
    return 0 < len(text) <= 9 and text.isascii() and text.isdigit()


