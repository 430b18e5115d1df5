"""`outloop service install|uninstall`: the broker as a user service, the dashboard as its operator.

Linux: a systemd user unit, `~/.config/systemd/user/outloop-broker.service`.
macOS: a launchd agent, `~/Library/LaunchAgents/dev.outloop.broker.plist`.
Both run `outloop broker` as you, restart it when it stops, and leave the keys
where they are: the service reads them from your login keyring. On Linux that
is the Secret Service on your session's D-Bus, which a systemd user service
reaches when the keyring is unlocked at login (GNOME and KDE do this through
PAM); on a headless machine, unlock it first (`gnome-keyring-daemon --unlock`)
or the broker starts and refuses every call with a clear keyring error.
`outloop` then attaches to the running broker instead of starting its own.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

from broker.paths import atomic_write
from outloop_tui.cli import UserError

UNIT_NAME = "outloop-broker.service"
AGENT_LABEL = "dev.outloop.broker"


def broker_command() -> list[str]:
    """How the service starts the broker: this Python and this install, whatever PATH holds."""
    return [sys.executable, "-m", "outloop_tui.cli", "broker"]


def service_env() -> dict[str, str]:
    """The variables the broker needs from this shell (where Outloop's files are)."""
    return {k: os.environ[k] for k in ("OUTLOOP_HOME", "OUTLOOP_SOCKET") if os.environ.get(k)}


def systemd_unit(command: list[str], env: dict[str, str]) -> str:
    """The text of the systemd user unit."""

    def quote(word: str) -> str:
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"' if any(c in word for c in ' "\\') else word

    lines = [
        "[Unit]",
        "Description=Outloop broker: agents call APIs through it, keys stay in the keyring",
        "After=default.target",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(quote(w) for w in command),
        *(f"Environment={quote(f'{k}={v}')}" for k, v in sorted(env.items())),
        "Restart=on-failure",
        "RestartSec=2",
        "UMask=0077",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    return "\n".join(lines)


def launchd_plist(command: list[str], env: dict[str, str], log_dir: Path) -> bytes:
    """The launchd agent's property list."""
    doc: dict[str, object] = {
        "Label": AGENT_LABEL,
        "ProgramArguments": command,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "Umask": 0o077,
        "StandardErrorPath": str(log_dir / "broker.log"),
    }
    if env:
        doc["EnvironmentVariables"] = env
    return plistlib.dumps(doc)


def _target() -> Path:
    home = Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "LaunchAgents" / f"{AGENT_LABEL}.plist"
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    return config / "systemd" / "user" / UNIT_NAME


def run_service(args: argparse.Namespace) -> int:
    target = _target()
    if args.action == "uninstall":
        if not target.exists():
            print(f"no Outloop service installed ({target} does not exist)")
            return 0
        _control("stop", target)
        target.unlink()
        _control("reload", target)
        print(f"removed {target}; the broker no longer starts by itself")
        return 0
    command, env = broker_command(), service_env()
    if sys.platform == "darwin":
        from broker.paths import Paths

        content = launchd_plist(command, env, Paths.from_env().state_dir)
    else:
        content = systemd_unit(command, env).encode()
    if args.dry_run:
        sys.stdout.write(content.decode())
        print(f"(dry run: nothing written; would write {target})", file=sys.stderr)
        return 0
    if target.exists() and target.read_bytes() != content and not args.force:
        raise UserError(f"{target} exists with other content; add --force to replace it")
    atomic_write(target, content)  # 0600 in a 0700 folder: the unit names where your keys' broker runs
    started = _control("start", target) if args.now else False
    how = (
        "started it"
        if started
        else "start it with "
        + (f"`launchctl load {target}`" if sys.platform == "darwin" else f"`systemctl --user enable --now {UNIT_NAME}`")
    )
    print(f"wrote {target}; {how}. `outloop` now attaches to that broker.")
    return 0


def _control(what: str, target: Path) -> bool:
    """Tell the service manager; False when there is none to tell (a container, CI)."""
    if sys.platform == "darwin":
        tool = shutil.which("launchctl")
        argv = {"start": ["load", str(target)], "stop": ["unload", str(target)], "reload": []}[what]
    else:
        tool = shutil.which("systemctl")
        argv = {
            "start": ["--user", "enable", "--now", UNIT_NAME],
            "stop": ["--user", "disable", "--now", UNIT_NAME],
            "reload": ["--user", "daemon-reload"],
        }[what]
    if tool is None or not argv:
        return False
    if what == "start" and sys.platform != "darwin":
        subprocess.run([tool, "--user", "daemon-reload"], capture_output=True, timeout=30)
    ran = subprocess.run([tool, *argv], capture_output=True, text=True, timeout=30)
    return ran.returncode == 0
