"""An SPOE agent that does nothing but ACK: the ceiling HAProxy itself puts on traced throughput.

``haproxy_e2e.py --ceiling`` runs the reference tracing config (8 events, ~86 arguments per
request) against this responder. It answers HELLO, then every NOTIFY with an empty ACK read off
the frame header alone: no argument is decoded, no span made. What HAProxy then serves is the most
any agent could get out of it with that config, and the HAProxy CPU per request is HAProxy's own
share of tracing (encoding the events' arguments, the SPOE round trips), which no agent can
remove. Only for benchmarks: it checks nothing (no version or frame-size negotiation beyond
echoing HAProxy's own limit, no fragmentation).

    python -m benchmarks.bare_agent --port 12345
"""

from __future__ import annotations

import argparse

from gevent import monkey

monkey.patch_all()

from gevent.server import StreamServer  # noqa: E402

from spoe_agent.protocol import codec  # noqa: E402
from spoe_agent.protocol.types import FrameType  # noqa: E402
from spoe_agent.protocol.varint import decode_varint  # noqa: E402

_NOTIFY = int(FrameType.NOTIFY)
_HELLO = int(FrameType.HAPROXY_HELLO)
_DISCONNECT = int(FrameType.HAPROXY_DISCONNECT)


def _agent_hello(payload: bytes) -> tuple[bytes, bool]:
    """The AGENT-HELLO for a HAPROXY-HELLO payload, and whether it was a health check."""
    items = codec.decode_kv_list(payload)
    hello = codec.encode_frame(FrameType.AGENT_HELLO, 0, 0, codec.encode_kv_list({
        "version": "2.0",
        "max-frame-size": min(int(items.get("max-frame-size", 16380)), 16380),
        "capabilities": "pipelining",
    }))
    return hello, bool(items.get("healthcheck"))


def serve(sock, address) -> None:  # type: ignore[no-untyped-def]
    buf = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return
        buf = buf + data if buf else data
        out = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            size = int.from_bytes(buf[pos:pos + 4], "big")
            stop = pos + 4 + size
            if stop > end:
                break
            ftype = buf[pos + 4]
            if ftype == _NOTIFY:
                stream_id, at = decode_varint(buf, pos + 9)
                frame_id, _ = decode_varint(buf, at)
                out.append(codec.ack(stream_id, frame_id))
            elif ftype == _HELLO:
                stream_id, at = decode_varint(buf, pos + 9)
                _, at = decode_varint(buf, at)
                hello, healthcheck = _agent_hello(buf[at:stop])
                out.append(hello)
                if healthcheck:
                    sock.sendall(b"".join(out))
                    return
            elif ftype == _DISCONNECT:
                out.append(codec.disconnect(FrameType.AGENT_DISCONNECT, 0, "bye"))
                sock.sendall(b"".join(out))
                return
            pos = stop
        buf = buf[pos:]
        if out:
            sock.sendall(b"".join(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    StreamServer((args.host, args.port), serve).serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
