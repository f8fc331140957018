"""Concurrent handlers run by reused greenlets (spoe_agent.handler_pool), as the server uses them."""

from __future__ import annotations

import gc
import weakref
from contextvars import ContextVar

import gevent
from gevent.event import Event

from spoe_agent.handler_pool import HandlerPool


def test_handlers_run_in_parked_greenlets_rather_than_new_ones() -> None:
    pool = HandlerPool(4)
    ran: list[object] = []  # strong references: a dead greenlet's id cannot be reused
    for _ in range(10):
        pool.spawn(lambda: ran.append(gevent.getcurrent()))
        assert pool.join(timeout=5)
    assert len(ran) == 10
    assert len({id(g) for g in ran}) == 1
    assert ran[0] is not gevent.getcurrent()


def test_spawn_waits_for_a_free_slot() -> None:
    pool = HandlerPool(2)
    release = Event()
    order: list[str] = []

    def blocked(name: str) -> None:
        order.append(f"{name} starts")
        release.wait()

    pool.spawn(blocked, "a")
    pool.spawn(blocked, "b")
    assert pool.full()
    third = gevent.spawn(pool.spawn, lambda: order.append("c starts"))
    gevent.sleep(0.01)
    assert order == ["a starts", "b starts"] and not third.dead  # waiting for a slot
    release.set()
    third.join(timeout=5)
    assert pool.join(timeout=5)
    assert order == ["a starts", "b starts", "c starts"]
    assert len(pool) == 0


def test_a_failing_handler_costs_neither_its_slot_nor_its_greenlet(caplog) -> None:
    pool = HandlerPool(1)
    ran: list[object] = []

    def boom() -> None:
        ran.append(gevent.getcurrent())
        raise RuntimeError("handler bug")

    pool.spawn(boom)
    assert pool.join(timeout=5)
    assert "handler bug" in caplog.text
    with gevent.Timeout(5):  # a slot never given back would make this wait for ever
        pool.spawn(lambda: ran.append(gevent.getcurrent()))
    assert pool.join(timeout=5)
    assert len(ran) == 2 and ran[0] is ran[1]


def test_kill_ends_the_handlers_in_flight() -> None:
    pool = HandlerPool(3)
    ended: list[str] = []

    def forever(name: str) -> None:
        try:
            gevent.sleep(3600)
        finally:
            ended.append(name)

    pool.spawn(forever, "started")
    gevent.sleep(0)  # it runs and parks in its sleep
    pool.spawn(forever, "not yet started")
    pool.kill()
    assert pool.join(timeout=0) and len(pool) == 0
    gevent.sleep(0.01)
    assert "started" in ended
    # What the pool holds now still runs: nothing of the killed handlers is left behind.
    done = Event()
    pool.spawn(done.set)
    assert done.wait(timeout=5)


_VAR: ContextVar[str] = ContextVar("_VAR", default="unset")


def test_a_handler_does_not_see_what_the_previous_one_set_in_its_context() -> None:
    pool = HandlerPool(1)
    seen: list[tuple[object, str]] = []

    def handler(value: str) -> None:
        seen.append((gevent.getcurrent(), _VAR.get()))
        _VAR.set(value)

    for value in ("a", "b"):
        pool.spawn(handler, value)
        assert pool.join(timeout=5)
    assert seen[0][0] is seen[1][0]  # the same greenlet ran both
    assert [v for _, v in seen] == ["unset", "unset"]


def test_a_parked_greenlet_keeps_nothing_of_its_last_handler() -> None:
    class Connection:  # stands for the server's _Client, which holds a socket
        pass

    pool = HandlerPool(1)
    connection = Connection()
    gone = weakref.ref(connection)
    pool.spawn(lambda c: None, connection)
    assert pool.join(timeout=5)
    gevent.sleep(0)  # the greenlet parks
    del connection
    gc.collect()
    assert gone() is None


def test_a_pool_killed_before_its_handler_started_leaves_no_dead_runner_for_the_next() -> None:
    """Code review: a reused runner handed work, then killed before the hub ran the hand-over
    (a connection reset in the read that spawned it), ran the work, parked, and died parked,
    still listed idle; the next connection's handler went to it and never ran (its NOTIFY
    never ACKed, its pool never empty)."""
    from spoe_agent import handler_pool

    ran: list[str] = []
    warm = HandlerPool(4)
    warm.spawn(ran.append, "warm")
    gevent.sleep(0.01)
    assert handler_pool._idle, "a runner parked for reuse"
    doomed = HandlerPool(4)
    doomed.spawn(ran.append, "after its connection went")
    doomed.kill(block=False)  # no yield in between, as when the flush meets a reset
    gevent.sleep(0.01)
    assert all(not runner.greenlet.dead for runner in handler_pool._idle)
    innocent = HandlerPool(2)
    innocent.spawn(ran.append, "innocent")
    assert innocent.join(timeout=1) and ran[-1] == "innocent" and not len(innocent)
    assert "after its connection went" not in ran  # nobody would read its ACK


def test_a_timer_a_handler_left_armed_does_not_cost_the_next_handler(caplog) -> None:
    """Code review: a handler that started a gevent.Timeout and returned left it to fire in
    its parked greenlet, which died still listed as idle; the next handler, on any
    connection, was given to it and never ran (its NOTIFY never ACKed)."""
    ran: list[str] = []

    def leaky() -> None:
        gevent.Timeout(0.05).start()
        ran.append("leaky")

    pool = HandlerPool(2)
    pool.spawn(leaky)
    assert pool.join(timeout=5)
    gevent.sleep(0.2)  # the timer fires in the parked greenlet
    other = HandlerPool(2)
    other.spawn(lambda: ran.append("next"))
    assert other.join(timeout=5), "the next handler never ran"
    assert ran == ["leaky", "next"]
    assert "left <Timeout" in caplog.text and "armed after it returned" in caplog.text

    # Left armed and fired while the greenlet runs the next handler: that handler fails
    # (logged), as it would with any exception, and the greenlet serves on.
    def leaky_then_slow() -> None:
        gevent.Timeout(0.01).start()

    pool.spawn(leaky_then_slow)
    assert pool.join(timeout=5)
    pool.spawn(lambda: gevent.sleep(0.1))
    assert pool.join(timeout=5)
    pool.spawn(lambda: ran.append("after"))
    assert pool.join(timeout=5)
    assert ran[-1] == "after"
    assert "concurrent handler" in caplog.text and "Timeout" in caplog.text
