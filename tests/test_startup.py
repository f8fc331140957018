"""What every start of the agent pays before it serves (each worker with ``--workers``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent("""
    import sys, types
    from importlib import metadata

    ran = []
    plugin = types.ModuleType("fake_gevent_plugin")
    plugin.subscriber = lambda event: ran.append(type(event).__name__)
    sys.modules["fake_gevent_plugin"] = plugin
    installed = metadata.EntryPoints([metadata.EntryPoint(
        name="fake", value="fake_gevent_plugin:subscriber",
        group="gevent.plugins.monkey.will_patch_all")])
    scans = []

    def entry_points(**selection):
        scans.append(selection)
        return installed.select(**selection) if selection else installed

    metadata.entry_points = entry_points
    from gevent import monkey
    from spoe_agent.cli import _patch_all

    _patch_all()
    assert monkey.is_module_patched("socket") and monkey.is_module_patched("ssl")
    assert metadata.entry_points is entry_points, "the lookup is put back"
    print(len(scans), ran)
""")


def test_gevent_patching_scans_the_entry_points_once_and_still_runs_its_plugins() -> None:
    """gevent looks its plugins up once per module it patches, each time across every
    installed distribution: 25 scans, a quarter of the CPU of starting the agent."""
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split(None, 1) == ["1", "['GeventWillPatchAllEvent']\n"], out.stdout
