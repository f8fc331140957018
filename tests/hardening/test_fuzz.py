"""Fuzzing the SPOP input side: whatever bytes arrive, in whatever chunks, the agent answers with
ACKs or one AGENT-DISCONNECT carrying a status from the spec table, and nothing escapes.

The judge is the oracle of the long-running fuzzer (:func:`benchmarks.fuzz_spop.replay`), so the
properties here and the benchmark job check the same promises: only ACK-able NOTIFYs or a
protocol violation with a spec status (never 99, the internal-error catch-all), an ACK for each
NOTIFY the connection can still answer, the AGENT-DISCONNECT as the last frame, nothing accepted
after CLOSED, buffering bounded by the frame size, every output frame well formed.

In-process properties run many examples; the live ones send fewer through a real agent process,
which must answer what the oracle predicts, close cleanly and stay up.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz_spop import (
    HELLO_26,
    HELLOS,
    BrokenPromise,
    check_live,
    chunked,
    fragmented_notify,
    fuzz,
    generate,
    main,
    random_message,
    replay,
    tracing_handler,
)
from spoe_agent.protocol import codec
from spoe_agent.protocol.connection import DEFAULT_MAX_FRAME_SIZE
from spoe_agent.protocol.types import FLAG_FIN, FrameType, Message, Status
from tests.protocol import strategies as sp
from tests.support.examples import examples
from tests.support.procs import AgentProcess
from tests.support.spop_client import SpopClient

AgentFactory = Callable[..., AgentProcess]
FUZZ = settings(deadline=None, max_examples=examples(200),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at points hypothesis chooses (and shrinks)."""
    if not data:
        return []
    cuts = draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=12, unique=True))
    bounds = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def notify_frames() -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda sid, fid, msgs: codec.notify(sid, fid, msgs),
        st.integers(0, sp.MAX_UINT64), st.integers(0, sp.MAX_UINT64), sp.message_lists,
    )


#: Frames HAProxy could send after its HELLO, valid ones and odd but well-formed ones.
after_hello_frames = st.one_of(
    notify_frames(),
    notify_frames(),
    sp.frames().map(lambda args: codec.encode_frame(*args)),
    st.sampled_from([
        codec.disconnect(FrameType.HAPROXY_DISCONNECT, 2, "a timeout occurred"),
        codec.encode_frame(FrameType.UNSET, 0, 3, b"", FLAG_FIN | 2),
        codec.encode_frame(42, 0, 0, b"future frame type"),
    ]),
)


@st.composite
def streams(draw: st.DrawFn, hello: bool = True) -> bytes:
    frames = [draw(st.sampled_from(HELLOS))] if hello else []
    frames += draw(st.lists(after_hello_frames, max_size=5))
    if draw(st.booleans()):
        frames += fragmented_notify(draw(st.randoms(use_true_random=False)))
    return b"".join(frames)


def judged(chunks: list[bytes], **kwargs: object) -> None:
    """Run the oracle; a broken promise fails with the input, for the reproducer."""
    try:
        outcome = replay(chunks, **kwargs)  # type: ignore[arg-type]
    except BrokenPromise as exc:
        raise AssertionError(f"{exc}\ninput: {b''.join(chunks).hex()}") from None
    assert outcome.status is None or outcome.status in {int(s) for s in Status}


# ------------------------------------------------------------------------------ in-process


@FUZZ
@given(st.data())
def test_arbitrary_bytes_before_hello(data: st.DataObject) -> None:
    raw = data.draw(st.one_of(st.binary(max_size=400), sp.mutated(st.just(HELLO_26))))
    judged(data.draw(chunkings(raw)))


@FUZZ
@given(st.data())
def test_valid_streams_in_any_chunking(data: st.DataObject) -> None:
    raw = data.draw(streams())
    judged(data.draw(chunkings(raw)))


@FUZZ
@given(st.data())
def test_mutated_streams_after_hello(data: st.DataObject) -> None:
    raw = data.draw(sp.mutated(streams()))
    judged(data.draw(chunkings(raw)), max_frame_size=data.draw(
        st.sampled_from([256, 16380, DEFAULT_MAX_FRAME_SIZE])))


@FUZZ
@given(st.randoms(use_true_random=False), st.data())
def test_huge_and_tiny_declared_lengths(rng: random.Random, data: st.DataObject) -> None:
    frames = [HELLOS[0], *fragmented_notify(rng)]
    index = data.draw(st.integers(0, len(frames) - 1))
    length = data.draw(st.sampled_from([0, 1, 3, 6, 7, 16380, 16381, DEFAULT_MAX_FRAME_SIZE + 1,
                                        0x7FFFFFFF, 0xFFFFFFFF]))
    frames[index] = length.to_bytes(4, "big") + frames[index][4:]
    judged(data.draw(chunkings(b"".join(frames))))


@FUZZ
@given(st.randoms(use_true_random=False), st.data())
def test_fragments_out_of_order_duplicated_or_cut(rng: random.Random, data: st.DataObject
                                                 ) -> None:
    fragments = fragmented_notify(rng)
    shuffled = data.draw(st.permutations(fragments))
    extra = data.draw(st.lists(st.sampled_from(fragments), max_size=3))
    keep = data.draw(st.integers(0, len(shuffled) + len(extra)))
    stream = b"".join([HELLOS[0], *(shuffled + extra)[:keep]])
    judged(data.draw(chunkings(stream)))


@FUZZ
@given(st.randoms(use_true_random=False))
def test_the_benchmark_generator_through_the_tracing_agent(rng: random.Random) -> None:
    """The long-running fuzzer's inputs, with the tracing agent parsing every message."""
    handler, upkeep, errors = tracing_handler()
    data = generate(rng)
    judged(chunked(rng, data), handler=handler)
    upkeep()
    assert errors() == 0


@settings(deadline=None, max_examples=examples(300))
@given(st.lists(st.builds(random_message, st.randoms(use_true_random=False)), max_size=6),
       st.lists(st.tuples(sp.names, sp.values), max_size=12))
def test_span_language_never_breaks_the_handler(messages: list[Message],
                                                stray: list[tuple[str, object]]) -> None:
    """Any message, however wrong, costs its own spans at most: no handler error, and the
    ACK the actions make is encodable."""
    handler, upkeep, errors = tracing_handler()
    for message in [*messages, Message("trace", [("id", "s1"), *stray])]:
        actions = handler([message])
        codec.ack(1, 1, actions)
    upkeep()
    assert errors() == 0


def test_the_long_running_fuzzer_in_process_finds_nothing() -> None:
    report = fuzz(seconds=120, max_inputs=2000, seed=20261128)
    assert report.inputs == 2000
    assert report.failures == [], report.failures
    assert sum(report.outcomes.values()) == 2000
    assert len(report.outcomes) >= 5, report.outcomes  # the inputs reach many outcomes
    assert report.handler_errors == 0


def test_the_fuzzer_cli_exits_zero() -> None:
    assert main(["--inputs", "200", "--seconds", "120", "--seed", "1"]) == 0


# ------------------------------------------------------------------------------------ live


@pytest.mark.alone  # its two workers answer a forwarded inject within the 1 s goodbye bound
@pytest.mark.parametrize("workers", ["1", "2"])
def test_live_agent_answers_every_input_and_stays_up(spoe_agent: AgentFactory,
                                                     workers: str) -> None:
    """Two workers answer an inject for the other's session when it does: ACKs then come in
    another order than one process's (SPOP allows it), never other ACKs."""
    agent = spoe_agent("--exporter", "none", "--workers", workers, app=None)
    address = (agent.host, agent.port)
    any_order = workers != "1"

    @settings(deadline=None, max_examples=examples(60),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def exchange(data: st.DataObject) -> None:
        raw = data.draw(st.one_of(sp.mutated(streams()), streams(), st.binary(max_size=200),
                                  st.builds(generate, st.randoms(use_true_random=False))))
        chunks = data.draw(chunkings(raw))
        try:
            check_live(address, chunks, DEFAULT_MAX_FRAME_SIZE, acks_any_order=any_order)
        except BrokenPromise as exc:
            raise AssertionError(f"{exc}\ninput: {raw.hex()}\n{agent.describe_logs()}") from None

    exchange()
    report = fuzz(seconds=120, max_inputs=500, seed=7, live=address, agent_pid=agent.process.pid,
                  acks_any_order=any_order)
    assert report.failures == [], report.failures
    assert agent.process.running
    with SpopClient(address) as client:
        assert client.handshake()["version"] == "2.0"
    logs = agent.logs()
    assert "Traceback" not in logs and "internal error" not in logs, agent.describe_logs()
