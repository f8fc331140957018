"""Decoding of Jaeger thrift, for the embedded viewer's receiver (and the tests).

The exporter never decodes; this turns an agent datagram or a collector post back into the
generated ``ttypes`` objects, with the same fastbinary specs the encoders use.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.jaeger.thrift.gen.agent import Agent as _agent
from opentelemetry.exporter.jaeger.thrift.gen.jaeger import ttypes as jt
from thrift.protocol.TBinaryProtocol import TBinaryProtocol
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.transport.TTransport import TMemoryBuffer

from spoe_agent.tracing.jaeger import codec
from spoe_agent.tracing.jaeger.specs import BATCH_ARGS, EMIT_BATCH_ARGS


def decode_emit_batch(datagram: bytes) -> tuple[str, Any]:
    """Decode an agent UDP datagram: (method name, Batch or None for other methods).

    Raises ValueError for anything that is not a compact-protocol thrift message.
    """
    trans = TMemoryBuffer(datagram)
    proto = TCompactProtocol(trans)
    try:
        name, _mtype, _seqid = proto.readMessageBegin()
    except Exception as exc:
        raise ValueError(f"not a thrift compact message: {exc}") from exc
    if name != "emitBatch":
        return name, None
    args = _agent.emitBatch_args()
    try:
        codec.decode_compact(args, proto, EMIT_BATCH_ARGS)
    except Exception as exc:
        raise ValueError(f"malformed emitBatch: {exc}") from exc
    return name, args.batch


def decode_batch_binary(body: bytes) -> Any:
    """Decode a TBinaryProtocol Batch (a collector POST body) into generated ``ttypes`` objects."""
    proto = TBinaryProtocol(TMemoryBuffer(body))
    batch = jt.Batch()
    try:
        codec.decode_binary(batch, proto, BATCH_ARGS)
    except Exception as exc:
        raise ValueError(f"malformed Batch: {exc}") from exc
    return batch
