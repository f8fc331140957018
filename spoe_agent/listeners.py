"""The sockets the agent listens on: binding ``HOST:PORT`` or ``unix:/path``, and the unix
socket files a previous run left behind.

Kept apart from the gevent server because the supervisor (``--workers``) and ``--check`` need
them without serving anything.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import ipaddress
import logging
import os
import shutil
import socket
import stat
import sys

from gevent.monkey import get_original

from spoe_agent.config import ignored_unix_options, split_bind

log = logging.getLogger(__name__)

# Probing a unix socket must block even where gevent patched ``socket``.
_OriginalSocket = get_original("socket", "socket")
BACKLOG = 1024
#: The unix sockets this process bound, by path, for its stop to remove only its own
#: (:func:`remove_listener_socket`).
_BOUND: dict[str, tuple[int, int, int]] = {}
#: The unix socket paths this process claimed (:func:`_claim`), held until its stop removes them.
_CLAIMS: dict[str, socket.socket] = {}


def _identity(status: os.stat_result) -> tuple[int, int, int]:
    """A file as made: an inode freed by an unlink is given to the next file at once, so the
    creation time (ctime) tells a socket bound again at the same path from ours."""
    return status.st_dev, status.st_ino, status.st_ctime_ns
# sockaddr_un's sun_path is 108 bytes on Linux, one of them the terminating NUL: a longer path
# passed --check, then failed the start with "AF_UNIX path too long" (black-box run).
UNIX_PATH_MAX = 107


def address_family(host: str) -> int:
    """IPv6 for a literal IPv6 host (``[::1]`` arrives as ``::1``), IPv4 otherwise."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def resolve_host(host: str) -> tuple[int, str]:
    """The family and address a TCP bind's host listens on.

    A name is resolved as HAProxy resolves a server's (the first address getaddrinfo gives,
    for any family), so that ``localhost`` on both sides means the same address: with ::1
    listed first, as on a stock Debian, HAProxy connected to ::1 while the agent listened on
    127.0.0.1 alone, and every connection was refused.
    """
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return address_family(host), host
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, None, socket.AF_UNSPEC,
                                                       socket.SOCK_DGRAM)[0]
    except socket.gaierror as exc:
        raise OSError(exc.errno, f"cannot resolve {host}: {exc.strerror}") from None
    return int(family), str(sockaddr[0])


def bind_problem(bind: str) -> str | None:
    """Why ``bind`` cannot be listened on, as far as ``--check`` can tell without taking it
    (a running agent may hold it): a unix socket's directory, a TCP host this machine has not.
    """
    target = split_bind(bind)
    if isinstance(target, str):
        size = len(os.fsencode(target))
        if size > UNIX_PATH_MAX:
            return (f"the path is {size} bytes long, and a unix socket's may be "
                    f"{UNIX_PATH_MAX} at most")
        directory = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(directory):
            return f"{directory} is not a directory"
        if not os.access(directory, os.W_OK | os.X_OK):
            return f"{directory} is not writable by this user"
        return None
    try:
        family, host = resolve_host(target[0])
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))  # any port: is the address one of this machine's?
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def make_listener(
    bind: str, backlog: int = BACKLOG, *, listen: bool = True, mode: int | None = None,
    group: str = "",
) -> socket.socket:
    """A bound socket for ``HOST:PORT`` or ``unix:/path`` (stale socket replaced), listening
    unless ``listen`` is false (:meth:`SpoaServer.start` then starts it). A unix socket gets
    ``mode`` and ``group`` before it listens, so no connection ever sees other permissions."""
    target = split_bind(bind)
    if isinstance(target, str):
        _claim(target)
        try:
            remove_stale_socket(target)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(target)
        except OSError:
            _release(target)
            raise
        step = ""
        try:
            if group:
                step = f"chgrp {group}"
                shutil.chown(target, group=group)
            if mode is not None:
                step = f"chmod {mode:o}"
                os.chmod(target, mode)
        except OSError as exc:
            sock.close()
            os.unlink(target)
            _release(target)
            raise OSError(exc.errno, f"{step} {target}: {exc.strerror}") from None
        _BOUND[target] = _identity(os.lstat(target))
    else:
        note = ignored_unix_options(bind, mode, group)
        if note:
            log.warning("%s", note)
        family, host = resolve_host(target[0])
        port = target[1]
        sock = socket.socket(family, socket.SOCK_STREAM)
        # A restarted agent (even after SIGKILL) must get its port back despite TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    if listen:
        sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _claim(path: str) -> None:
    """Claim ``path`` for this process, or raise EADDRINUSE if another process has.

    A socket bound but not listening yet (the runner listens only once its hooks have run)
    refuses a probe just as a stale one does: two agents started at once on one path had the
    second unlink the first one's socket and take the path, and the first served an unlinked
    socket nobody could reach (black-box run). The claim is a Linux abstract unix socket named
    after the path: binding it is atomic, and it goes with the last process holding it, even
    one killed, so nothing is left to clean up. A process re-claims its own path freely.
    Elsewhere (no abstract namespace), only the probe remains.
    """
    if path in _CLAIMS or not sys.platform.startswith("linux"):
        return
    digest = hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()
    claim = _OriginalSocket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0spoe-agent:{digest[:64]}")
    except OSError as exc:
        claim.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise OSError(errno.EADDRINUSE,
                      f"another spoe-agent is starting or serving on {path}") from None
    _CLAIMS[path] = claim


def _release(path: str) -> None:
    claim = _CLAIMS.pop(path, None)
    if claim is not None:
        claim.close()


def remove_stale_socket(path: str) -> None:
    """Unlink ``path`` if it is a unix socket nobody listens on (a previous run's).

    Anything else raises OSError: a file that is not a socket (unlinking it would destroy
    someone's data), or a socket another process serves (taking it over would silently cut
    that agent off from HAProxy, where a TCP port in use is refused).
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = _OriginalSocket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (TimeoutError, BlockingIOError):
        # A full backlog: someone listens. A unix socket says so at once with EAGAIN (the
        # probe has a timeout, so it does not block), which was reported as it was, "Resource
        # temporarily unavailable", rather than as the other agent it is (black-box run).
        pass
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another process listens on {path}")


def remove_listener_socket(bind: str) -> None:
    """After a clean stop, remove the unix socket file this agent listened on, if it is still
    the one it bound: another agent may have replaced it meanwhile, and a probe could not tell
    its socket, bound but not listening yet, from a stale one (code review: the old agent's
    stop unlinked the new one's)."""
    target = split_bind(bind)
    if isinstance(target, str):
        ours = _BOUND.pop(target, None)
        if ours is not None:
            try:
                if _identity(os.lstat(target)) == ours:
                    with contextlib.suppress(OSError):
                        os.unlink(target)
            except OSError:
                pass
            finally:
                _release(target)
            return
        try:
            remove_stale_socket(target)
        except OSError:
            pass  # not ours any more: leave it
