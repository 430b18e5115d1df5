"""`outloop service install|uninstall`: a user service that runs `outloop broker`, written and taken back exactly."""

from __future__ import annotations

import configparser
import os
import plistlib
import subprocess
import sys
from pathlib import Path

from outloop_tui.cmd_service import broker_command, launchd_plist, systemd_unit

OUTLOOP = [sys.executable, "-m", "outloop_tui.cli"]


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([*OUTLOOP, "service", *args], capture_output=True, text=True, timeout=60, env=env)


def test_the_unit_runs_this_outloops_broker_with_its_home(tmp_path: Path) -> None:
    unit = systemd_unit(broker_command(), {"OUTLOOP_HOME": str(tmp_path / "my home")})
    parsed = configparser.ConfigParser(strict=False, interpolation=None)
    parsed.read_string(unit)
    assert parsed["Service"]["ExecStart"].split() == [sys.executable, "-m", "outloop_tui.cli", "broker"]
    assert parsed["Service"]["Environment"] == f'"OUTLOOP_HOME={tmp_path / "my home"}"'
    assert parsed["Service"]["UMask"] == "0077" and parsed["Install"]["WantedBy"] == "default.target"


def test_the_launchd_agent_says_the_same(tmp_path: Path) -> None:
    doc = plistlib.loads(launchd_plist(broker_command(), {"OUTLOOP_HOME": "/h"}, tmp_path))
    assert doc["ProgramArguments"][-1] == "broker" and doc["EnvironmentVariables"] == {"OUTLOOP_HOME": "/h"}
    assert doc["KeepAlive"] == {"SuccessfulExit": False} and doc["Umask"] == 0o077


def test_install_then_uninstall_leaves_the_home_as_it_was(tmp_path: Path, outloop_home: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    dry = run(home, "install", "--dry-run")
    assert dry.returncode == 0 and "ExecStart=" in dry.stdout
    assert not any(home.rglob("*"))  # a dry run writes nothing
    first = run(home, "install")
    assert first.returncode == 0, first.stderr
    unit = home / ".config" / "systemd" / "user" / "outloop-broker.service"
    assert f"OUTLOOP_HOME={outloop_home}" in unit.read_text()
    assert run(home, "install").returncode == 0  # the same again is fine
    unit.write_text(unit.read_text() + "# mine\n")
    clash = run(home, "install")
    assert clash.returncode == 1 and "--force" in clash.stderr
    assert run(home, "install", "--force").returncode == 0
    gone = run(home, "uninstall")
    assert gone.returncode == 0 and not unit.exists()
