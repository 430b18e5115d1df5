"""`[audit] syslog = true`: every audit record also goes to the local syslog / journald.

A copy off the broker's own files: the system logger writes it where this user
cannot edit it (``journalctl -t outloop-audit``, or /var/log/auth.log with the
authpriv facility on a classic syslog). Records hold no secret and no body, so
the copy holds none either.
"""

from __future__ import annotations

import json
from typing import Any

IDENT = "outloop-audit"
_opened = False


def send(record: dict[str, Any]) -> None:
    """Hand one record (as its JSON line) to the system logger; never raises."""
    global _opened
    try:
        import syslog
    except ImportError:  # not on this platform
        return
    if not _opened:
        syslog.openlog(IDENT, syslog.LOG_PID, getattr(syslog, "LOG_AUTHPRIV", syslog.LOG_USER))
        _opened = True
    line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
    try:
        syslog.syslog(syslog.LOG_INFO, line)
    except (OSError, ValueError):
        pass
