"""Show a received trace as an indented tree (terminal) or as a JSON-ready dict (JSON lines).

A span hangs under its parent: the ``parentSpanId`` when that span is in the trace, otherwise the
first CHILD_OF, then FOLLOWS_FROM reference that points into the trace.  Spans whose parent is not
in the trace (the root, or children of spans that never arrived) are shown at the top level.
Siblings are ordered by start time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from spoe_agent.viewer.receiver import ReceivedSpan

FOLLOWS_MARK = "(follows from)"
ERROR_MARK = "!ERROR"
ORPHAN_MARK = "(parent not received)"
INDENT = "  "


def format_duration(us: int) -> str:
    if us < 1000:
        return f"{us}us"
    if us < 1_000_000:
        return f"{us / 1000:.3f}ms"
    return f"{us / 1_000_000:.3f}s"


def _link(span: ReceivedSpan, ids: set[str]) -> tuple[str | None, str | None]:
    """(parent span id within the trace, how it attaches: CHILD_OF / FOLLOWS_FROM) or (None, None)."""
    if span.parent_span_id and span.parent_span_id in ids and span.parent_span_id != span.span_id:
        return span.parent_span_id, "CHILD_OF"
    for wanted in ("CHILD_OF", "FOLLOWS_FROM"):
        for ref_type, trace_id, span_id in span.references:
            if (
                ref_type == wanted
                and trace_id == span.trace_id
                and span_id in ids
                and span_id != span.span_id
            ):
                return span_id, ref_type
    return None, None


def tree_order(spans: Sequence[ReceivedSpan]) -> list[tuple[int, ReceivedSpan, str | None]]:
    """Preorder walk: (depth, span, how it attaches to the line's parent or None at top level)."""
    by_id: dict[str, ReceivedSpan] = {}
    for span in spans:
        by_id.setdefault(span.span_id, span)  # a duplicate id keeps its first arrival
    ids = set(by_id)
    children: dict[str | None, list[tuple[ReceivedSpan, str | None]]] = {}
    for span in by_id.values():
        parent, how = _link(span, ids)
        children.setdefault(parent, []).append((span, how))
    for siblings in children.values():
        siblings.sort(key=lambda item: (item[0].start_us, item[0].operation_name))

    out: list[tuple[int, ReceivedSpan, str | None]] = []
    seen: set[str] = set()

    def walk(items: Sequence[tuple[ReceivedSpan, str | None]]) -> None:
        stack = [(0, item) for item in reversed(items)]
        while stack:
            level, (span, how) = stack.pop()
            if span.span_id in seen:
                continue
            seen.add(span.span_id)
            out.append((level, span, how if level else None))
            stack.extend((level + 1, item) for item in reversed(children.get(span.span_id, ())))

    walk(children.get(None, []))
    # spans caught in a parent cycle are reachable from no root: show them at the top level
    for span in sorted(by_id.values(), key=lambda s: (s.start_us, s.operation_name)):
        if span.span_id not in seen:
            walk([(span, None)])
    return out


def span_line(span: ReceivedSpan, depth: int = 0, how: str | None = None) -> str:
    """``name [service] duration`` with its markers, indented by depth."""
    line = f"{INDENT * depth}{span.operation_name} [{span.service_name}] "
    line += format_duration(span.duration_us)
    if how == "FOLLOWS_FROM":
        line += f" {FOLLOWS_MARK}"
    elif depth == 0 and span.parent_span_id:
        # Its parent is in no trace printed here: the caller's span, or a span of this trace
        # printed before or still open (a session TTL ends those ~30 s later). Unmarked, a
        # fragment read as a whole trace that the agent had broken.
        line += f" {ORPHAN_MARK}"
    if span.error:
        description = span.tags.get("otel.status_description")
        line += f" {ERROR_MARK}: {description}" if description else f" {ERROR_MARK}"
    return line


def render_trace(spans: Sequence[ReceivedSpan]) -> str:
    """The whole trace: a header line, then one line per span (no trailing newline)."""
    if not spans:
        return "(empty trace)"
    start = min(s.start_us for s in spans)
    end = max(s.end_us for s in spans)
    header = f"trace {spans[0].trace_id} ({len(spans)} spans, {format_duration(end - start)})"
    lines = [header]
    lines += [span_line(span, depth, how) for depth, span, how in tree_order(spans)]
    return "\n".join(lines)


def span_to_json(span: ReceivedSpan) -> dict[str, Any]:
    return {
        "trace_id": span.trace_id,
        "span_id": span.span_id,
        "parent_span_id": span.parent_span_id,
        "operation_name": span.operation_name,
        "service_name": span.service_name,
        "start_us": span.start_us,
        "duration_us": span.duration_us,
        "error": span.error,
        "flags": span.flags,
        "references": [
            {"type": ref_type, "trace_id": trace_id, "span_id": span_id}
            for ref_type, trace_id, span_id in span.references
        ],
        "tags": {key: _jsonable(value) for key, value in span.tags.items()},
        "logs": [
            {"timestamp_us": ts, "fields": {k: _jsonable(v) for k, v in fields.items()}}
            for ts, fields in span.logs
        ],
        "process_tags": {key: _jsonable(value) for key, value in span.process_tags.items()},
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    return value


def to_json(spans: Sequence[ReceivedSpan]) -> dict[str, Any]:
    """One trace as a dict: spans in tree order, each with its depth and how it attaches."""
    if not spans:
        return {"trace_id": None, "span_count": 0, "spans": []}
    start = min(s.start_us for s in spans)
    end = max(s.end_us for s in spans)
    out_spans = []
    for depth, span, how in tree_order(spans):
        entry = span_to_json(span)
        entry["depth"] = depth
        entry["attached_by"] = how
        out_spans.append(entry)
    return {
        "trace_id": spans[0].trace_id,
        "span_count": len(spans),
        "services": sorted({s.service_name for s in spans}),
        "start_us": start,
        "duration_us": end - start,
        "error": any(s.error for s in spans),
        "spans": out_spans,
    }
