"""An embedded Jaeger trace viewer: receive the agent's Jaeger thrift and print traces as trees.

Used by the dev stack when no Jaeger runs, and by the end-to-end tests as the receiver that
decodes exactly what the agent puts on the wire.
"""

from spoe_agent.viewer.receiver import JaegerReceiver, ReceivedSpan, TraceAssembler
from spoe_agent.viewer.render import render_trace, to_json

__all__ = ["JaegerReceiver", "ReceivedSpan", "TraceAssembler", "render_trace", "to_json"]
