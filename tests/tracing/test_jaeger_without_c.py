"""Without thrift's C extension the agent runs, and writes the same Jaeger bytes.

thrift's sdist builds ``fastbinary`` only where a C++ compiler is at hand, and says nothing when
it cannot; some platforms have no wheel. The agent then did not start at all (an ImportError,
even for ``--version``). Each check runs in a fresh interpreter where importing ``fastbinary``
fails, as it does in such an installation.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_BLOCK = "import sys; sys.modules['thrift.protocol.fastbinary'] = None; "


def _run(code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _BLOCK + code, *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_the_encoders_and_decoders_agree_with_the_official_exporter_byte_for_byte() -> None:
    done = _run(
        "import pytest; status = pytest.main(sys.argv[1:]); "
        "from spoe_agent.tracing.jaeger import codec; "
        "print('accelerated', codec.ACCELERATED); sys.exit(status)",
        "-q", "-p", "no:cacheprovider", "tests/tracing/test_jaeger.py",
        "tests/tracing/test_span_records.py", "tests/test_viewer.py",
        "-k", "byte_identical or equals_the_official or encode_as_their or decode")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "accelerated False" in done.stdout, done.stdout
    passed = int(done.stdout.rsplit(" passed", 1)[0].rsplit(None, 1)[-1])
    assert passed >= 20, done.stdout


def test_the_agent_starts_and_says_what_is_missing() -> None:
    cli = "from spoe_agent.cli import main; sys.exit(main())"
    version = _run(cli, "--version")
    assert version.returncode == 0 and version.stdout.startswith("spoe-agent "), version.stderr
    check = _run(cli, "--check", "--exporter", "jaeger", "--workers", "1")
    assert check.returncode == 0, check.stderr
    assert "configuration OK" in check.stdout, check.stdout
    assert "thrift.protocol.fastbinary) is not installed" in check.stderr, check.stderr
    quiet = _run(cli, "--check", "--exporter", "none", "--workers", "1")
    assert quiet.returncode == 0 and "fastbinary" not in quiet.stderr, quiet.stderr
