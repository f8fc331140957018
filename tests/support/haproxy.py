"""Real HAProxy processes for integration tests: Debian's 2.6 and sid's 3.2 (mux-spop engine).

The two versions run different SPOE engines (2.6's applet with fragmentation and async, 3.1+'s
multiplexer with per-connection stream ids), so every protocol-level test runs against both;
a mock HAProxy would only confirm our own reading of the spec.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.procs import ManagedProcess, wait_for_port, wait_for_unix_socket

REPO_ROOT = Path(__file__).resolve().parents[2]

#: What the tests call each version, and how to find it.
VERSION_LABELS = ("2.6", "3.2")


def cache_dir() -> Path:
    """Where scripts/fetch-haproxy-3.2.sh unpacks things (``SPOE_AGENT_CACHE`` overrides)."""
    return Path(os.environ.get("SPOE_AGENT_CACHE") or REPO_ROOT / ".cache")


def sid_wrapper_path() -> Path:
    return cache_dir() / "haproxy-sid" / "haproxy"


def haproxy_binaries() -> dict[str, str]:
    """Version label -> executable, for the versions present on this machine.

    ``SPOE_AGENT_HAPROXY_26`` / ``SPOE_AGENT_HAPROXY_32`` override the defaults, e.g. to point
    at a source build. A missing version is simply absent; the fixtures turn that into a skip
    with a reason that says how to get it.
    """
    found: dict[str, str] = {}
    candidates = {
        "2.6": [
            os.environ.get("SPOE_AGENT_HAPROXY_26"),
            "/usr/sbin/haproxy",
            shutil.which("haproxy"),
        ],
        "3.2": [os.environ.get("SPOE_AGENT_HAPROXY_32"), str(sid_wrapper_path())],
    }
    for label, paths in candidates.items():
        for path in paths:
            if path and os.path.isfile(path) and os.access(path, os.X_OK):
                found[label] = path
                break
    return found


def binary_version(binary: str) -> str:
    """The ``x.y.z`` version the binary reports (e.g. ``2.6.12-1+deb12u4`` -> ``2.6.12``)."""
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"HA-?Proxy version (\d+\.\d+(?:\.\d+)?)", out)
    if not match:
        raise RuntimeError(f"cannot read the version of {binary}: {out!r}")
    return match.group(1)


class HAProxyConfigError(RuntimeError):
    """``haproxy -c`` refused the configuration; the message carries HAProxy's own output."""


class HAProxy:
    """One HAProxy instance in the foreground, with a stats socket, configured from text.

    ``{tmp}`` in either configuration text is replaced by the instance's directory (a plain
    substitution, not ``str.format``, because HAProxy log formats are full of braces). When the
    ``global`` section declares no ``stats socket``, one is added at ``{tmp}/admin.sock`` so
    :meth:`stats` always works.
    """

    def __init__(
        self,
        binary: str,
        config_text: str,
        tmpdir: str | os.PathLike[str],
        spoe_text: str | None = None,
        *,
        name: str = "haproxy",
    ) -> None:
        self.binary = binary
        self.tmpdir = Path(tmpdir)
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.config_path = self.tmpdir / "haproxy.cfg"
        self.spoe_path = self.tmpdir / "spoe.cfg"
        self.admin_socket = self.tmpdir / "admin.sock"
        self.process: ManagedProcess | None = None
        self._generation = 0
        self._write(config_text, spoe_text)

    # ----------------------------------------------------------------------- configuration

    def _expand(self, text: str) -> str:
        return text.replace("{tmp}", str(self.tmpdir))

    def _write(self, config_text: str, spoe_text: str | None) -> None:
        config = self._expand(config_text)
        if not re.search(r"^\s*stats\s+socket\s", config, re.M):
            config = re.sub(
                r"^(global[^\n]*\n)",
                rf"\1    stats socket {self.admin_socket} mode 600 level admin\n",
                config,
                count=1,
                flags=re.M,
            )
        self.config_text = config
        self.config_path.write_text(config)
        if spoe_text is not None:
            self.spoe_path.write_text(self._expand(spoe_text))

    def check(self) -> str:
        """Validate with ``haproxy -c``; returns its output (warnings included) when valid."""
        result = subprocess.run(
            [self.binary, "-c", "-f", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        output = (result.stdout + result.stderr).strip()
        if result.returncode != 0:
            raise HAProxyConfigError(
                f"{self.binary} -c rejected {self.config_path} (status {result.returncode}):\n"
                f"{output}\n--- haproxy.cfg ---\n{self.config_text}"
                + (
                    f"--- spoe.cfg ---\n{self.spoe_path.read_text()}"
                    if self.spoe_path.exists()
                    else ""
                )
            )
        return output

    def tcp_binds(self) -> list[tuple[str, int]]:
        """The TCP addresses the config binds, to know when HAProxy is ready to serve."""
        binds = []
        for match in re.finditer(r"^\s*bind\s+(\S+)", self.config_text, re.M):
            addr = match.group(1)
            host, sep, port = addr.rpartition(":")
            if not sep or not port.isdigit() or host.startswith(("unix@", "abns@", "/")):
                continue
            host = host.strip("[]")
            binds.append((host if host not in ("", "*", "0.0.0.0") else "127.0.0.1", int(port)))
        return binds

    # ----------------------------------------------------------------------------- process

    def _spawn(self, extra: list[str]) -> ManagedProcess:
        self._generation += 1
        suffix = "" if self._generation == 1 else f".{self._generation}"
        proc = ManagedProcess(
            f"{self.name}{suffix}",
            [self.binary, "-db", "-f", str(self.config_path), *extra],
            self.tmpdir,
            cwd=self.tmpdir,
        )
        return proc.start()

    def _wait_ready(self, proc: ManagedProcess, timeout: float) -> None:
        wait_for_unix_socket(self.admin_socket, timeout, proc)
        for host, port in self.tcp_binds():
            wait_for_port(host, port, timeout, proc)

    def start(self, timeout: float = 15.0) -> HAProxy:
        self.check()
        self.process = self._spawn([])
        self._wait_ready(self.process, timeout)
        return self

    def reload(
        self,
        config_text: str | None = None,
        spoe_text: str | None = None,
        timeout: float = 15.0,
    ) -> None:
        """Replace the process the way ``haproxy -sf`` deployments do: new one up, old one drains.

        Master-worker reloads are avoided on purpose: the sid binary runs through an unpacked
        dynamic loader, and a master re-executing ``/proc/self/exe`` would re-run the loader
        without the haproxy path.
        """
        if self.process is None:
            raise RuntimeError("reload() before start()")
        if config_text is not None:
            self._write(config_text, spoe_text)
        elif spoe_text is not None:
            self.spoe_path.write_text(self._expand(spoe_text))
        self.check()
        old = self.process
        new = self._spawn(["-sf", str(old.pid)])
        try:
            old.wait(timeout)
        except subprocess.TimeoutExpired:
            new.stop()
            raise TimeoutError(
                f"old HAProxy pid {old.pid} still running {timeout}s after reload\n"
                f"{old.describe_logs()}\n{new.describe_logs()}"
            ) from None
        old.stop()
        self.process = new
        self._wait_ready(new, timeout)

    def soft_stop(self, timeout: float = 15.0) -> int | None:
        """SIGUSR1: stop listening and let the streams in flight finish, like a graceful stop."""
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGUSR1)
        try:
            self.process.wait(timeout)
        finally:
            self.process.stop()
        return self.process.returncode

    def stop(self) -> int | None:
        if self.process is None:
            return None
        return self.process.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def logs(self) -> str:
        """HAProxy's own output (its ``log stdout`` lines and warnings), for assertions."""
        if self.process is None:
            return ""
        return self.process.stdout_text() + self.process.stderr_text()

    def describe_logs(self) -> str:
        return self.process.describe_logs() if self.process is not None else "(not started)"

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------ stats socket

    def command(self, cmd: str, timeout: float = 5.0) -> str:
        """One runtime-API command on the admin socket (non-interactive: HAProxy closes after)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.admin_socket))
            sock.sendall(cmd.encode() + b"\n")
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def stats(self) -> list[dict[str, str]]:
        """``show stat`` as one dict per proxy/server row, keyed by HAProxy's CSV column names."""
        text = self.command("show stat")
        if not text.startswith("# "):
            raise RuntimeError(f"unexpected 'show stat' output: {text[:200]!r}")
        return list(csv.DictReader(io.StringIO(text[2:])))

    def server_stats(self, backend: str, server: str) -> dict[str, str]:
        for row in self.stats():
            if row["pxname"] == backend and row["svname"] == server:
                # "* L7OK" is L7OK with the next check already running (HAProxy's marker): the
                # tests want the last result, whenever the stats happen to be read.
                row["check_status"] = row.get("check_status", "").removeprefix("* ")
                return row
        raise KeyError(f"no server {backend}/{server} in 'show stat'")

    def wait_server_status(
        self, backend: str, server: str, status: str = "UP", timeout: float = 10.0
    ) -> dict[str, str]:
        """Poll until the server's check status is ``status`` (e.g. "UP", "DOWN")."""
        deadline = time.monotonic() + timeout
        row = self.server_stats(backend, server)
        while row["status"] != status:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{backend}/{server} is {row['status']!r} (check: {row.get('check_status')!r}"
                    f" {row.get('check_desc')!r}), not {status!r}, after {timeout}s\n"
                    f"{self.describe_logs()}"
                )
            time.sleep(0.1)
            row = self.server_stats(backend, server)
        return row
