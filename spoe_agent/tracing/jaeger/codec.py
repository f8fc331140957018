"""thrift's C codec (``fastbinary``), or the same four calls on thrift's pure-Python protocols.

thrift builds its C extension only where a C++ compiler was at hand (its sdist falls back to
pure Python without a word, and some platforms have no wheel). Without it the agent used not
to start at all; now it exports the same bytes, only slower (``ACCELERATED`` is False, and
the pipeline logs a warning once: the C codec is most of why export is cheap). The pure path
goes through the protocols' generic spec-driven ``writeStruct``/``readStruct``, which read the
converted specs (``specs``) as fastbinary does; tests compare the bytes of both.
"""

from __future__ import annotations

from typing import Any

from thrift.protocol.TBinaryProtocol import TBinaryProtocol
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.transport.TTransport import TMemoryBuffer

try:
    from thrift.protocol import fastbinary as _fastbinary
except ImportError:  # pragma: no cover - in a subprocess: tests/tracing/test_jaeger_without_c.py
    _fastbinary = None

ACCELERATED = _fastbinary is not None


def _spec_driven(protocol: type) -> type:
    """``protocol`` writing and reading nested structs by the ``[class, spec]`` of their field,
    as fastbinary does, rather than by the generated ``write``/``read`` methods: the encoders
    hand it plain objects that have none (``encode._RecordHead`` and its references)."""

    class SpecDriven(protocol):  # type: ignore[misc, valid-type]
        def writeContainerStruct(self, val: Any, spec: Any) -> None:  # noqa: N802
            self.writeStruct(val, spec[1])

        def readContainerStruct(self, spec: Any) -> Any:  # noqa: N802
            obj = spec[0]()
            self.readStruct(obj, spec[1])
            return obj

    return SpecDriven


def _pure_encoder(protocol: type) -> Any:
    protocol = _spec_driven(protocol)

    def encode(obj: Any, args: list) -> bytes:
        buf = TMemoryBuffer()
        protocol(buf).writeStruct(obj, args[1])
        return buf.getvalue()

    return encode


def _pure_decoder(protocol: type) -> Any:
    protocol = _spec_driven(protocol)

    def decode(obj: Any, proto: Any, args: list) -> None:
        protocol(proto.trans).readStruct(obj, args[1])

    return decode


if _fastbinary is not None:
    encode_compact: Any = _fastbinary.encode_compact
    encode_binary: Any = _fastbinary.encode_binary
    decode_compact: Any = _fastbinary.decode_compact
    decode_binary: Any = _fastbinary.decode_binary
else:  # pragma: no cover - see above
    encode_compact = _pure_encoder(TCompactProtocol)
    encode_binary = _pure_encoder(TBinaryProtocol)
    decode_compact = _pure_decoder(TCompactProtocol)
    decode_binary = _pure_decoder(TBinaryProtocol)
