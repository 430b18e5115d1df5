"""`outloop broker`: the headless broker and leak watcher in the foreground.

With no dashboard attached there is nobody to ask, so `ask` rules are refused
with approval_unavailable.

The log (stderr) has refusals, leak alerts, state and config events; a line per
allowed call (its attempt and outcome) only with `--verbose`: under load a line
per call costs the broker more than the call itself. The audit log has them all.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

from broker.engine import Engine
from broker.events import (
    AlertIgnored,
    AlertOpened,
    AlertResolved,
    AlertUpdated,
    AuditRecorded,
    BrokerStateChanged,
    ConfigRejected,
    ConfigReloaded,
    Event,
    Refused,
)
from broker.paths import Paths


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def describe(event: Event, verbose: bool = True) -> str | None:
    """One log line for an engine event (never a secret: events carry none).

    Without `verbose`, audit records of calls get a line only when the call failed
    upstream (a refusal has its own `Refused` event).
    """
    if isinstance(event, AuditRecorded):
        r = event.record
        kind = r.get("event")
        if kind not in ("attempt", "outcome"):
            return f"audit {kind}: {r.get('file') or ''} {r.get('set_aside') or ''}".rstrip()
        if not verbose and not (kind == "outcome" and r.get("status") == "upstream_error"):
            return None
        what = (
            f"{r.get('tenant') or '-'} {r.get('credential') or '-'} "
            f"{r.get('method') or ''} {r.get('path') or ''}".strip()
        )
        if kind == "outcome":
            return f"outcome  {what} -> {r.get('status')} ({r.get('ms')} ms)"
        return f"attempt  {what} -> {r.get('decision')}"
    if isinstance(event, Refused):
        return f"refused  {event.tenant or '-'} {event.credential or '-'} -> {event.code}: {event.message}"
    if isinstance(event, BrokerStateChanged):
        return f"broker {event.state}{': ' + event.detail if event.detail else ''}"
    if isinstance(event, ConfigReloaded):
        return f"config reloaded ({event.tenants} tenants)"
    if isinstance(event, ConfigRejected):
        return f"config change rejected, keeping the last good one: {event.message}"
    if isinstance(event, AlertOpened | AlertUpdated | AlertResolved | AlertIgnored):
        alert = event.alert
        verb = {AlertOpened: "opened", AlertUpdated: "moved", AlertResolved: "resolved", AlertIgnored: "ignored"}
        return (
            f"leak alert [{alert.severity}] {alert.path}:{alert.line} {alert.rule} "
            f"({alert.preview}) {verb[type(event)]}"
        )
    return None


async def _serve(paths: Paths, verbose: bool = False) -> None:
    engine = Engine(paths)

    def log_event(event: Event) -> None:
        line = describe(event, verbose)
        if line:
            _log(line)

    engine.subscribe(log_event)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await engine.start()
    _log(f"listening on {paths.socket} (headless: `ask` rules are refused)")
    try:
        await stop.wait()
    finally:
        await engine.stop()
        _log("stopped")


def run_broker(args: argparse.Namespace) -> int:
    paths = Paths.from_env()
    paths.check_socket_path()
    asyncio.run(_serve(paths, verbose=getattr(args, "verbose", False)))
    return 0
