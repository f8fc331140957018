"""The supervisor of ``--workers N``: one listening socket, N worker interpreters, restarts.

Workers are fresh interpreters (``python -c <boot> ... --worker-index i``), not forks: a
fork would copy a running gevent hub, the exporter's flush loop and the parent's sockets, which
is how subtle shared-state bugs start. A worker runs the same code and the same configuration
as the supervisor, whatever happens to the working directory or the ``-c`` file meanwhile
(:meth:`Supervisor.worker_argv`, :data:`ENV_CONFIG_FD`). The supervisor alone listens and
accepts, and hands each connection to the least loaded worker (:mod:`spoe_agent.workers.handoff`
says why the kernel's own spreading is not good enough), so the address never stops accepting,
even while a worker is being replaced: the connections it held reset, HAProxy reconnects, the
others take them.

A dead worker is restarted with the same index, so it owns the same sessions and listens on
the same peer socket; if it keeps dying right after starting, restarts back off up to
:data:`MAX_BACKOFF_S` instead of spinning.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import gevent
from gevent.event import Event

import spoe_agent
from spoe_agent.config import AgentConfig, bind_text
from spoe_agent.listeners import make_listener, remove_listener_socket
from spoe_agent.logs import EVERY_TIME, flush_held_lines
from spoe_agent.runner import (
    EXIT_FORCED,
    SHUTDOWN_TIMEOUT,
    StartupError,
    ignore_signals,
)
from spoe_agent.stop_signals import IGNORED_SIGNALS, STOP_SIGNALS, stopped_early
from spoe_agent.workers.handoff import (
    FREEABLE_PREFIX,
    GIVE_SIGNAL,
    PENDING_PREFIX,
    WAITING_PREFIX,
    channel_pair,
    read_move,
    read_report,
    send_connection,
)
from spoe_agent.workers.mesh import peer_path

log = logging.getLogger(__name__)

ENV_HANDOFF_FD = "SPOE_AGENT_HANDOFF_FD"
ENV_LISTEN_FAMILY = "SPOE_AGENT_LISTEN_FAMILY"
ENV_RUNTIME_DIR = "SPOE_AGENT_RUNTIME_DIR"
#: An inherited descriptor of an unlinked file holding the ``-c`` file's bytes, as the
#: supervisor read them: a worker restarted after the file was edited, moved or cleaned away
#: must not run another configuration than its peers, or none.
ENV_CONFIG_FD = "SPOE_AGENT_CONFIG_FD"
#: A worker that dies sooner than this after starting counts as crash-looping.
STABLE_AFTER_S = 2.0
#: A serving worker reports once a second (workers._REPORT_S). Silent this long, it gets no new
#: connection; silent for HUNG_AFTER_S (stopped, or stuck in a loop that never yields), it is
#: killed and replaced: HAProxy would otherwise wait on its connections, each event until
#: `timeout processing`, for as long as it hangs, while the health check, which the other
#: workers answer, stays green. Killing resets those connections; HAProxy reconnects.
SILENT_AFTER_S = 2.5
HUNG_AFTER_S = 5.0
#: A replacement that has not begun serving this long after it started is killed as hung too
#: (a worker serves within a few seconds: imports, then its peers' SYNC, 2 s at most). Before,
#: one stopped in its start-up was never killed, and was handed new connections meanwhile
#: (code review).
STARTING_AT_MOST_S = 30.0
#: The supervisor checks its workers every _POLL_S; a check this late means it was not running
#: itself (stopped, frozen with its cgroup, starved): its workers' reports wait unread in the
#: channels, so their silence says nothing, and they get the full HUNG_AFTER_S again.
_LATE_CHECK_S = 1.0
#: A worker that is stopping (it closed its channel) and still runs after this long is killed,
#: whoever stopped it: stopping takes SHUTDOWN_TIMEOUT at most, plus its flush.
STOPPING_AT_MOST_S = SHUTDOWN_TIMEOUT + 10.0
MAX_BACKOFF_S = 5.0
_POLL_S = 0.05
_FIRST_ACCEPT_WAIT_S = 10.0
_FULL_RETRY_S = 0.05
#: How often connections may move between workers (one at a time), and how uneven they must
#: be: a worker with this many more than another gives one away. Once the worker asked has
#: handed one over, the next may be asked for after ``_REBALANCE_ANSWERED_S``: the counts are
#: already updated (``_move``), and at one a second a restart's skew of 150 connections (HAProxy
#: 2.6 under load) took 75 s to even out. A worker that has none idle to give is asked again
#: only after ``_REBALANCE_S``.
_REBALANCE_S = 1.0
_REBALANCE_ANSWERED_S = 0.1
_REBALANCE_GAP = 2
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(spoe_agent.__file__)))
#: The longest path a unix socket can be bound to (sun_path is 108 bytes, NUL included).
_MAX_SOCKET_PATH = 107


def runtime_dir(workers: int) -> str:
    """A new directory for the peer sockets and the write counts.

    mkdtemp makes it 0700: only this user can reach the peer sockets, which is what lets
    workers trust what they read there. In a ``TMPDIR`` too deep for a unix socket's path, it
    goes under /tmp instead (said in the log), rather than every worker failing to bind.
    """
    path = tempfile.mkdtemp(prefix="spoe-agent-")
    if len(os.fsencode(peer_path(path, workers - 1))) <= _MAX_SOCKET_PATH:
        return path
    os.rmdir(path)
    try:
        short = tempfile.mkdtemp(prefix="spoe-agent-", dir="/tmp")
    except OSError as exc:
        raise StartupError(f"the temporary directory {tempfile.gettempdir()} is too deep for "
                           f"the workers' unix sockets, and /tmp is not usable: {exc}") from None
    log.warning("the temporary directory %s is too deep for the workers' unix sockets "
                "(%d bytes at most): using %s", tempfile.gettempdir(), _MAX_SOCKET_PATH, short)
    return short


class _Slot:
    """Worker ``index``: its current process and its restart history."""

    __slots__ = ("index", "proc", "started", "backoff", "restart_at", "restarts", "channel",
                 "reported", "freeable", "handed", "waiting", "reader", "serving", "heard",
                 "closing", "closing_since", "pending", "spans_lost")

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = 0.0
        self.restart_at = 0.0
        self.restarts = 0
        self.channel: Any = None  # our end of the hand-off socket pair
        self.reported = 0  # open connections, as the worker last said
        self.freeable = 0  # of those, how many would give their slot to one that waits
        self.pending = 0  # spans its export queue held, as it last said
        self.spans_lost = 0  # those its processes held when they died, in all
        self.handed = 0  # connections handed over since that report
        self.waiting = False  # the connection it hands back next waited there for a slot
        self.reader: gevent.Greenlet | None = None
        self.serving = False  # it sent a report: it serves, its routing set up
        self.heard = 0.0  # when it last wrote on its channel (a report, a connection handed back)
        self.closing = False  # it closed its channel (stopping, not hung), or it was killed
        self.closing_since = 0.0

    @property
    def load(self) -> int:
        """Connections open: what the workers are kept even by."""
        return self.reported + self.handed

    @property
    def taken(self) -> int:
        """Slots a connection handed here could not have: idle and silent connections give
        theirs up (server.SpoaServer.evictable)."""
        return max(0, self.reported - self.freeable) + self.handed


class Supervisor:
    """Start ``config.workers`` workers on one inherited listener and keep them running."""

    def __init__(self, config: AgentConfig, argv: list[str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.slots = [_Slot(i) for i in range(config.workers)]
        self.runtime_dir = ""
        self._listener = None
        self._config_copy: Any = None  # the -c file's bytes, for the workers (ENV_CONFIG_FD)
        self._stop = Event()
        self._signalled = False  # a stop signal came (not just a failed start stopping us)
        self._forced = False
        self._failed = 0  # a worker's exit status, when one could not start
        self._all_serving = Event()
        self._next_rebalance = 0.0
        self._asked: _Slot | None = None  # the worker last asked for a connection
        self._last_check = 0.0
        # A worker's share of max_connections (workers.worker_config): it accepts no more.
        self._share = max(1, -(-config.max_connections // config.workers))

    def worker_argv(self, index: int) -> list[str]:
        # Not `python -m spoe_agent`: -m puts the working directory first on sys.path, so a
        # checkout there (the README's `pip install .` leaves one), or any spoe_agent/
        # directory, would run in the workers instead of the package the supervisor runs,
        # compiled or not. The boot line imports from the directory the supervisor's own
        # spoe_agent came from.
        boot = (f"import sys; sys.path[0] = {_PACKAGE_ROOT!r}; "
                "from spoe_agent.cli import main; raise SystemExit(main())")
        # Later flags win in argparse, so these override whatever argv already says.
        return [sys.executable, "-c", boot, *self.argv,
                "--workers", str(self.config.workers), "--worker-index", str(index)]

    def run(self) -> int:
        """Listen, start the workers, hand them connections and replace those that die, until
        a stop signal; the exit status is one process's (a worker's failure, or forced)."""
        self.runtime_dir = runtime_dir(self.config.workers)
        try:
            self._listener = make_listener(self.config.bind, mode=self.config.unix_mode,
                                           group=self.config.unix_group)
        except OSError as exc:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            raise StartupError(f"cannot listen on {bind_text(self.config.bind)} "
                               f"({self.config.set_by('bind')}): {exc.strerror or exc}") from None
        self._listener.setblocking(True)  # a cooperative wait under gevent, not a busy one
        if self.config.config_file:
            # Unlinked at once: nothing in TMPDIR for a cleaner to age away, gone with us.
            self._config_copy = tempfile.TemporaryFile()
            self._config_copy.write(self.config.config_bytes)
            self._config_copy.flush()
        metrics = None
        if self.config.metrics:
            metrics = self._start_metrics()
        for signum in STOP_SIGNALS:
            gevent.signal_handler(signum, self._on_signal)
        ignore_signals(IGNORED_SIGNALS)
        if stopped_early():
            self._signalled = True
            self._stop.set()
        log.info("spoe-agent supervisor: %d workers%s on %s (peer sockets in %s)",
                 len(self.slots),
                 "" if "workers" in self.config.sources else " (auto: one per usable core)",
                 bind_text(self.config.bind), self.runtime_dir)
        acceptor = None
        try:
            for slot in self.slots:
                if self._stop.is_set():
                    break  # stopped before all started (black-box run: spawned, then stopped)
                try:
                    self._spawn(slot)
                except OSError as exc:
                    raise StartupError(f"cannot start worker {slot.index}: {exc}") from None
            acceptor = gevent.spawn(self._accept_loop)
            while not self._stop.wait(_POLL_S):
                self._check()
        finally:
            if acceptor is not None:
                acceptor.kill()
            if self._listener is not None:
                # Refused from now on, as by one process that stops: kept open while the
                # workers drained, the kernel took connections nobody would serve, reset
                # without a word when it closed (code review).
                self._listener.close()
            self._shutdown()
            if metrics is not None:
                metrics.stop()
        return EXIT_FORCED if self._forced else self._failed

    def _on_signal(self) -> None:
        """The first signal stops the workers in order; a second one, during that, kills them.

        Workers take repeated signals as one (a process manager signals them along with us), so
        the operator's "stop now, lose the flush" goes through here, as with one process. A
        stop the supervisor began itself (a worker that could not start) is no first signal:
        the operator's first SIGTERM then forced the kill (black-box run).
        """
        if not self._signalled:
            self._signalled = True
            self._stop.set()
            return
        if self._forced:
            return
        self._forced = True
        log.warning("second signal during shutdown: killing the workers now, "
                    "unflushed spans are lost")
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.kill()

    def _start_metrics(self) -> Any:
        from spoe_agent.metrics import bind_failure
        from spoe_agent.workers.metrics import WorkersMetricsServer, worker_metrics_urls

        bind = self.config.metrics
        urls = worker_metrics_urls(bind, len(self.slots))
        metrics = WorkersMetricsServer(bind, urls, lambda: [s.restarts for s in self.slots],
                                       lambda: sum(s.spans_lost for s in self.slots))
        try:
            metrics.start()
        except OSError as exc:
            assert self._listener is not None
            self._listener.close()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            raise StartupError(f"cannot serve metrics on {bind_text(bind)}: "
                               f"{bind_failure(exc, bind)}") from None
        return metrics

    def _spawn(self, slot: _Slot) -> None:
        """Start ``slot``'s worker; raises OSError if the system would not (no process or
        descriptor to spare)."""
        assert self._listener is not None
        ours, theirs = channel_pair()
        env = dict(os.environ)
        env[ENV_HANDOFF_FD] = str(theirs.fileno())
        env[ENV_LISTEN_FAMILY] = str(int(self._listener.family))
        env[ENV_RUNTIME_DIR] = self.runtime_dir
        fds = [theirs.fileno()]
        env.pop(ENV_CONFIG_FD, None)
        if self._config_copy is not None:
            env[ENV_CONFIG_FD] = str(self._config_copy.fileno())
            fds.append(self._config_copy.fileno())
        try:
            # Its own session: a terminal's Ctrl-C reaches the supervisor only, which then stops
            # the workers in order instead of racing their restart.
            slot.proc = subprocess.Popen(
                self.worker_argv(slot.index), pass_fds=fds, env=env, start_new_session=True,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        slot.channel = ours
        slot.reported = slot.freeable = slot.handed = 0
        slot.serving = slot.closing = slot.waiting = False
        slot.started = slot.heard = time.monotonic()
        slot.reader = gevent.spawn(self._read_reports, slot, ours)
        # Never rate-limited (logs.py): in a crash loop each start and death is the story, and
        # the backoff already bounds how often they come.
        log.info(f"worker {slot.index} started (pid %d)", slot.proc.pid, extra=EVERY_TIME)

    def _read_reports(self, slot: _Slot, channel: Any) -> None:
        hub = gevent.get_hub()
        watcher = hub.loop.io(channel.fileno(), 1)
        try:
            while True:
                hub.wait(watcher)
                try:
                    data, fds, _, _ = socket.recv_fds(channel, 4096, 1)
                except BlockingIOError:
                    continue
                except OSError:
                    data, fds = b"", []
                if not self._received(slot, channel, data, fds):
                    return  # the worker is stopping or exited; _check notices and restarts it
        finally:
            watcher.close()

    def _received(self, slot: _Slot, channel: Any, data: bytes, fds: list[int]) -> bool:
        """One message from worker ``slot`` on ``channel`` (its current one, or that of the
        process before); False once the channel is closed."""
        current = slot.channel is channel
        if current:
            slot.heard = time.monotonic()
        # Only the very next message can be the connection a WAITING_PREFIX announced (the
        # worker sends the two at once); anything else means it could not be sent.
        waiting, slot.waiting = slot.waiting, False
        if fds:
            self._move(slot, data, fds[0], waiting=current and waiting)
            return True
        if not data:
            if current and not slot.closing:
                slot.closing = True
                slot.closing_since = time.monotonic()
            return False
        if data == WAITING_PREFIX:
            slot.waiting = current
            return True
        pending = read_report(data, PENDING_PREFIX)
        if pending is not None:
            if current:
                slot.pending = pending
            return True
        freeable = read_report(data, FREEABLE_PREFIX)
        if freeable is not None:
            if current:
                slot.freeable = freeable
            return True
        count = read_report(data)
        if count is not None and current:
            slot.reported, slot.handed = count, 0
            if not slot.serving:
                slot.serving = True
                if all(s.serving for s in self.slots):
                    self._all_serving.set()
        return True

    def _accept_loop(self) -> None:
        """Accept HAProxy's connections and give each to the least loaded live worker."""
        assert self._listener is not None
        listener = self._listener
        # At start, connections wait in the listen backlog until every worker serves: a worker
        # that served alone would route sessions to peers still starting, and the first
        # requests' injects could go unanswered. A worker that never comes up does not hold
        # the others back for long.
        self._all_serving.wait(_FIRST_ACCEPT_WAIT_S)
        while True:
            try:
                conn, address = listener.accept()
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                gevent.sleep(0.1)
                continue
            try:
                # Here, in the accept loop: the next connections wait in the listen backlog.
                self._hand_over_when_possible(conn, address)
            finally:
                conn.close()

    def _hand_over(self, conn: Any, address: Any, state: Any = None,
                   giver: _Slot | None = None) -> bool:
        now = time.monotonic()
        # With room first, then those with room once a connection gives its slot up; serving
        # ones first among each (a starting one answers its HELLO only once it is up, if it
        # ever is), and the fewest open connections first.
        share = self._share
        ranked = sorted(self.slots,
                        key=lambda s: (s.taken >= share, s.load >= share, not s.serving, s.load))
        for slot in ranked:
            if slot.channel is None or slot is giver or slot.closing:
                continue
            if (slot.serving and now - slot.heard > SILENT_AFTER_S
                    and now - self._last_check < _LATE_CHECK_S):
                continue  # hung, most likely (_check kills it): HAProxy would wait on it
            if (state is not None or giver is not None) and (
                    not slot.serving or slot.taken >= share):
                # A connection another worker served goes to one that serves it now: HAProxy
                # is using it (a new one waits for its HELLO answer, which a starting worker
                # gives once it is up, or a full one once a connection closes). One a full
                # worker passed back goes to one with room (reports count the slots of
                # connections silent or idle too long as room: server.SpoaServer.evictable).
                continue
            try:
                send_connection(slot.channel, conn, address, state)
            except OSError:
                continue  # dead, or its queue is full: the next one
            slot.handed += 1
            return True
        return False

    def _move(self, giver: _Slot, data: bytes, fd: int, waiting: bool = False) -> None:
        """A connection ``giver`` handed back: on to the least loaded worker. One it served
        (``_rebalance`` asked for it), or, ``waiting``, one that waited there for a slot
        (server.SpoaServer._pass_on_waiting), which its open count never held."""
        try:
            conn = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            log.warning(f"worker {giver.index} sent a descriptor that is not a socket")
            return
        try:
            moved = read_move(data)
            if moved is None:
                log.warning(f"worker {giver.index} sent a descriptor that is not a connection")
                return
            if not waiting:
                giver.reported = max(0, giver.reported - 1)  # until its next report says so
                if giver is self._asked:  # answered: the next may be asked for soon
                    self._asked = None
                    self._next_rebalance = min(self._next_rebalance,
                                               time.monotonic() + _REBALANCE_ANSWERED_S)
            if self._hand_over(conn, *moved, giver=giver):
                return
            # Every other worker filled up meanwhile: back to the one that held it a moment
            # ago, whatever its share (closing it would lose what HAProxy sent on it).
            try:
                send_connection(giver.channel, conn, *moved)
                giver.handed += 1
            except (OSError, TypeError):
                if moved[1] is None:  # a new connection (passed on by a full worker) waits
                    gevent.spawn(self._hand_over_then_close, conn.dup(), moved[0])
                else:
                    log.warning("no worker could take a connection handed back: closing it")
        finally:
            conn.close()

    def _hand_over_when_possible(self, conn: Any, address: Any) -> None:
        """Every worker is at max_connections and its hand-off queue is full: the connection
        waits, as with one process (server._ConnectionPool says why). Closing it reset a
        HAProxy connection with its HELLO unread and no AGENT-DISCONNECT."""
        waited = False
        while not self._hand_over(conn, address):
            if not waited:
                waited = True
                now = time.monotonic()
                if any(s.serving and not s.closing and now - s.heard <= SILENT_AFTER_S
                       for s in self.slots):
                    log.warning("every worker is at max_connections: new connections "
                                "wait in the listen backlog")
                else:
                    log.warning("no worker is serving (restarting, or silent: hung?): new "
                                "connections wait in the listen backlog")
            gevent.sleep(_FULL_RETRY_S)

    def _hand_over_then_close(self, conn: Any, address: Any) -> None:
        try:
            self._hand_over_when_possible(conn, address)
        finally:
            conn.close()

    def _rebalance(self, now: float) -> None:
        """Ask the worker with the most connections for one, when it has ``_REBALANCE_GAP``
        more than the one with the fewest (see workers.handoff: HAProxy keeps its
        connections, and a worker's work follows them)."""
        if now < self._next_rebalance or not self._all_serving.is_set():
            return
        live = [s for s in self.slots if s.channel is not None and s.serving]
        if len(live) < 2:
            return
        busiest = max(live, key=lambda s: s.load)
        idlest = min(live, key=lambda s: s.load)
        if busiest.load - idlest.load < _REBALANCE_GAP or idlest.load >= self._share:
            return
        self._next_rebalance = now + _REBALANCE_S
        if busiest.proc is not None and busiest.proc.poll() is None:
            self._asked = busiest
            busiest.proc.send_signal(GIVE_SIGNAL)

    def _check(self) -> None:
        now = time.monotonic()
        if self._last_check and now - self._last_check > _LATE_CHECK_S:
            for slot in self.slots:  # we were not running: their reports are still unread
                slot.heard = now
        self._last_check = now
        for slot in self.slots:
            proc = slot.proc
            if proc is not None:
                status = proc.poll()
                if status is None:
                    if slot.backoff and now - slot.started > STABLE_AFTER_S:
                        slot.backoff = 0.0
                    if slot.serving and not slot.closing and now - slot.heard > HUNG_AFTER_S:
                        log.error(f"worker {slot.index} (pid %d) has not reported for %.1fs: "
                                  "hung; killing it, its connections reset and HAProxy "
                                  "reconnects to the others", proc.pid, now - slot.heard,
                                  extra=EVERY_TIME)
                        slot.closing, slot.closing_since = True, now
                        proc.kill()  # its death is then the usual restart
                    elif (not slot.serving and not slot.closing and self._all_serving.is_set()
                          and now - slot.started > STARTING_AT_MOST_S):
                        log.error(f"worker {slot.index} (pid %d) has not begun serving %.0fs "
                                  "after it started: hung; killing it", proc.pid,
                                  now - slot.started, extra=EVERY_TIME)
                        slot.closing, slot.closing_since = True, now
                        proc.kill()
                    elif slot.closing and now - slot.closing_since > STOPPING_AT_MOST_S:
                        log.error(f"worker {slot.index} (pid %d) has been stopping for %.0fs; "
                                  "killing it", proc.pid, now - slot.closing_since,
                                  extra=EVERY_TIME)
                        slot.closing_since = now  # once per bound, should SIGKILL not do
                        proc.kill()
                    continue
                lived = now - slot.started
                slot.proc = None
                if slot.reader is not None:
                    slot.reader.kill(block=False)
                if slot.channel is not None:
                    slot.channel.close()
                    slot.channel = None
                if not slot.serving and not self._all_serving.is_set():
                    # It never served, and the agent has not served yet: what stops it (a
                    # metrics port taken, a certificate it cannot read) will stop its
                    # replacements too. Refuse to start, as one process would, rather than run
                    # on without it, restarting it forever.
                    log.error(f"worker {slot.index} (pid %d) could not start (%s); stopping",
                              proc.pid, _describe_status(status), extra=EVERY_TIME)
                    self._failed = status if status > 0 else 1
                    self._stop.set()
                    return
                _restart_later(slot, now, crashed=lived < STABLE_AFTER_S)
                # A worker that stopped cleanly (status 0) flushed its queue; any other end
                # took the spans it held with it: its last report, their mean count over a
                # second, is what can be said of them.
                lost = slot.pending if status != 0 else 0
                slot.spans_lost += lost
                slot.pending = 0
                log.warning(f"worker {slot.index} (pid %d) exited with %s after %.1fs; "
                            "restarting%s%s", proc.pid, _describe_status(status), lived,
                            f" in {slot.backoff:.1f}s" if slot.backoff else "",
                            f"; about {lost} spans waiting for export in it (their mean count "
                            "over its last reported second) are lost" if lost else "",
                            extra=EVERY_TIME)
            if slot.proc is None and now >= slot.restart_at:
                slot.restarts += 1
                try:
                    self._spawn(slot)
                except OSError as exc:
                    # fork's EAGAIN (a pids limit), no memory, no descriptor: the other workers
                    # serve on, and this one is tried again (code review: it stopped the agent,
                    # with a traceback).
                    _restart_later(slot, now)
                    log.error(f"worker {slot.index} could not be started: %s; trying again in "
                              "%.1fs", exc, slot.backoff, extra=EVERY_TIME)
        self._rebalance(now)

    def _shutdown(self) -> None:
        """SIGTERM every worker (each ends its sessions and flushes), wait, then clean up."""
        log.info("supervisor: stopping %d workers", len(self.slots))
        running = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for proc in running:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOPPING_AT_MOST_S
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in time; killing it", proc.pid,
                            extra=EVERY_TIME)
                proc.kill()
                proc.wait()
        if self._listener is not None:
            self._listener.close()
            remove_listener_socket(self.config.bind)
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
        if self._config_copy is not None:
            self._config_copy.close()
        flush_held_lines()
        log.info("supervisor: stopped")


def _restart_later(slot: _Slot, now: float, crashed: bool = True) -> None:
    """Schedule ``slot``'s next start: after a backoff that doubles while it keeps failing."""
    if crashed:
        slot.backoff = min(MAX_BACKOFF_S, max(0.1, slot.backoff * 2))
    slot.restart_at = now + slot.backoff


def _describe_status(status: int) -> str:
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"status {status}"
