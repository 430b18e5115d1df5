"""A desktop notification that a call waits for an operator, where the desktop offers one.

`notify-send` (libnotify) on Linux desktops, `osascript` on macOS; nothing where
neither exists (a server, a container). Fire and forget: the call waits for its
answer either way, and a notifier that hangs must not hold up the broker.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

_UNSAFE = dict.fromkeys(range(32), " ")


def notify_desktop(title: str, body: str) -> bool:
    """Show `title` and `body` (plain text, no secret) on the desktop; False when nothing can."""
    title, body = title.translate(_UNSAFE)[:120], body.translate(_UNSAFE)[:400]
    if sys.platform == "darwin" and (osascript := shutil.which("osascript")):
        script = f"display notification {_applescript(body)} with title {_applescript(title)}"
        argv = [osascript, "-e", script]
    elif notify_send := shutil.which("notify-send"):
        argv = [notify_send, "--app-name=Outloop", "--urgency=critical", title, body]
    else:
        return False
    try:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return False
    return True


def _applescript(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
