"""Fixed sample data for the dashboard's snapshot tests and screenshots.

Everything that would vary between runs is pinned: folders live under one fixed
path, the app's clocks are constants, audit records carry fixed timestamps, and
the leak watcher is off (its alerts are given as fixed data).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.audit import AuditLog
from broker.calls.approvals import Approvals
from broker.config import ConfigEditor
from broker.engine import Engine
from broker.events import AuditRecorded, PendingApproval
from broker.leaks.alerts import Alert
from broker.leaks.watcher import RAISE_LIMIT_HINT, WatcherHealth
from broker.paths import Paths
from broker.secrets import Secret, SecretStore
from outloop_tui.app import OutloopApp

ROOT = Path("/tmp/outloop-snapshots")
LOCK = Path("/tmp/outloop-snapshots.lock")
NOW = 1_000.0  # the app's monotonic clock
WALL = 1_767_268_800.0  # 2026-01-01T12:00:00Z
SECRETS = {
    ("acme", "github"): "ghp_SNAPSHOTsecretVALUEmustNEVERshow0001",
    ("globex", "stripe"): "sk_live_SNAPSHOTsecretVALUE0002",
}

AUDIT = [
    {
        "ts": "2026-01-01T11:58:02.114Z",
        "event": "attempt",
        "tenant": "acme",
        "credential": "github",
        "method": "GET",
        "path": "/repos/acme/web/pulls",
        "decision": "allow",
        "approver": "policy",
    },
    {
        "ts": "2026-01-01T11:58:02.301Z",
        "event": "outcome",
        "tenant": "acme",
        "credential": "github",
        "method": "GET",
        "path": "/repos/acme/web/pulls",
        "decision": "allow",
        "status": 200,
        "bytes": 5120,
        "ms": 187.0,
    },
    {
        "ts": "2026-01-01T11:58:40.020Z",
        "event": "attempt",
        "tenant": "acme",
        "credential": "github",
        "method": "DELETE",
        "path": "/repos/acme/web",
        "decision": "denied_by_policy",
        "reason": "clean up the old repo",
    },
    {
        "ts": "2026-01-01T11:59:05.500Z",
        "event": "attempt",
        "tenant": "globex",
        "credential": "github",
        "method": "GET",
        "path": "/repos/acme/web",
        "decision": "wrong_tenant",
    },
    {
        "ts": "2026-01-01T11:59:30.000Z",
        "event": "attempt",
        "tenant": "globex",
        "credential": "stripe",
        "method": "POST",
        "path": "/v1/refunds",
        "decision": "approved",
        "approver": "operator",
        "reason": "refund order 1042",
    },
    {
        "ts": "2026-01-01T11:59:30.410Z",
        "event": "outcome",
        "tenant": "globex",
        "credential": "stripe",
        "method": "POST",
        "path": "/v1/refunds",
        "decision": "approved",
        "status": 201,
        "bytes": 734,
        "ms": 402.0,
    },
    {
        "ts": "2026-01-01T11:59:48.000Z",
        "event": "attempt",
        "tenant": None,
        "credential": "github",
        "method": "GET",
        "path": "/user",
        "decision": "unmapped_workspace",
    },
    {
        "ts": "2026-01-01T11:59:52.000Z",
        "event": "outcome",
        "tenant": "acme",
        "credential": "github",
        "method": "GET",
        "path": "/repos/acme/api/actions/runs",
        "decision": "allow",
        "status": 404,
        "bytes": 88,
        "ms": 95.0,
    },
]


@dataclass
class SampleAlerts:
    """Stands in for the leak watcher's alert store: fixed alerts, no file watching."""

    alerts: list[Alert] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)

    def open_alerts(self) -> list[Alert]:
        ignored = {f for f, _ in self.ignored}
        return [a for a in self.alerts if a.fingerprint not in ignored]

    def ignore(self, fingerprint: str, reason: str) -> None:
        self.ignored.append((fingerprint, reason))


class SampleWatcher:
    """Stands in for the leak watcher: a first scan under way, folders past the inotify limit
    polled, one folder it cannot read; fixed, no file watching."""

    def health(self) -> WatcherHealth:
        acme, globex = ROOT / "clients" / "acme", ROOT / "clients" / "globex"
        return WatcherHealth(
            running=True,
            initial_scan_done=False,
            workspaces=(str(acme / "web"), str(acme / "api"), str(globex / "shop")),
            missing=(),
            files_scanned=1234,
            last_error=None,
            files_to_scan=40_000,
            watched_folders=7_800,
            polled_folders=1_200,
            watch_budget=7_800,
            warning=(
                "inotify watch limit too low: 1,200 of 9,000 folders are polled (changes there are seen within "
                f"about 500 ms, at some CPU cost); raise it with `{RAISE_LIMIT_HINT}`"
            ),
            scanning=("acme", "globex"),
            scan_kind="first scan",
            scan_done=1234,
            scan_total=40_000,
            unreadable=(f"{acme / 'api' / 'pgdata'} (permission denied)",),
            unreadable_count=1,
        )

    async def rescan(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sample_alerts() -> list[Alert]:
    shop = ROOT / "clients" / "globex" / "shop"
    web = ROOT / "clients" / "acme" / "web"
    return [
        Alert(
            id="al-1",
            ts=_iso(WALL - 95),
            tenant="globex",
            workspace=str(shop),
            path=str(shop / "debug.log"),
            line=2,
            rule="managed-secret:acme/github",
            severity="critical",
            preview="ghp_****01",
            fingerprint="a" * 64,
            status="open",
        ),
        Alert(
            id="al-2",
            ts=_iso(WALL - 1800),
            tenant="acme",
            workspace=str(web),
            path=str(web / ".env"),
            line=3,
            rule="openai-api-key",
            severity="high",
            preview="sk-p****Qz",
            fingerprint="b" * 64,
            status="open",
        ),
    ]


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Hold ROOT for one test: concurrent test runs on this machine take turns."""
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(*, tenants: bool = True) -> Paths:
    """Write the sample config (and secrets, and the files alerts point at) under ROOT."""
    shutil.rmtree(ROOT, ignore_errors=True)
    home = ROOT / "home"
    home.mkdir(parents=True, mode=0o700)
    paths = Paths(home / "config.toml", home / "state", ROOT / "broker.sock")
    if not tenants:
        return paths
    folders = {
        "acme": [ROOT / "clients" / "acme" / "web", ROOT / "clients" / "acme" / "api"],
        "globex": [ROOT / "clients" / "globex" / "shop"],
    }
    for group in folders.values():
        for folder in group:
            folder.mkdir(parents=True)
    (folders["acme"][0] / ".env").write_text(
        "NODE_ENV=development\nPORT=3000\nOPENAI_API_KEY=sk-proj-Xn4k2Lq9Vw7Zr1Tb8Qz\n"
        "DATABASE_URL=postgres://localhost/acme\n"
    )
    (folders["globex"][0] / "debug.log").write_text(
        "GET /v1/charges 200\nretrying with token ghp_SNAPSHOTsecretVALUEmustNEVERshow0001\nGET /v1/charges 200\n"
    )
    paths.config_file.write_text("[broker]\napproval_timeout = 120\nalways_ttl = 3600\n")
    editor = ConfigEditor(paths)
    editor.add_tenant("acme", "Acme Corp")
    for folder in folders["acme"]:
        editor.add_workspace("acme", str(folder))
    editor.add_credential(
        "acme",
        "github",
        {
            "base_url": "https://api.github.com",
            "allow": ["GET /repos/**"],
            "ask": ["POST /repos/*/*/issues"],
            "deny": ["DELETE /**"],
        },
    )
    editor.add_credential("acme", "openai", {"base_url": "https://api.openai.com/v1"})
    editor.add_tenant("globex", "Globex")
    editor.add_workspace("globex", str(folders["globex"][0]))
    editor.add_credential(
        "globex", "stripe", {"base_url": "https://api.stripe.com", "allow": ["GET /v1/**"], "ask": ["POST /v1/refunds"]}
    )
    editor.save()
    store = SecretStore()
    for (tenant, name), value in SECRETS.items():
        store.set(tenant, name, Secret(value))
    return paths


def make_app(
    paths: Paths, *, secrets: SecretStore | None = None, alerts: bool = True, scanning: bool = False
) -> OutloopApp:
    engine = Engine(paths, secrets=secrets)
    engine.approvals = Approvals(engine._publish, clock=lambda: NOW)
    # Records the app itself causes (a lock, say) carry the sample's time, not today's.
    engine.audit = AuditLog(paths.audit_dir, clock=lambda: datetime.fromtimestamp(WALL, UTC))
    app = OutloopApp(engine, watch=False, serve=False, clock=lambda: NOW, wall=lambda: WALL)
    if alerts:
        engine.alerts = SampleAlerts(sample_alerts())  # type: ignore[assignment]
    if scanning:
        engine.watcher = SampleWatcher()  # type: ignore[assignment]
    return app


async def ready(app: OutloopApp, *, audit: bool = True) -> None:
    await asyncio.wait_for(app.ready.wait(), 15)
    if audit:
        for record in AUDIT:
            app.bridge(AuditRecorded(dict(record)))
    app.dashboard.refresh_view()


def ask(
    app: OutloopApp,
    *,
    age: float = 14.0,
    path: str = "/repos/acme/api/issues",
    reason: str = "file the failing test as an issue",
) -> asyncio.Task[Any]:
    """Make a call wait for the operator, as the broker does for an `ask` rule."""
    approval = PendingApproval(
        id=f"ap-{path}",
        created=NOW - age,
        deadline=NOW - age + 120,
        created_wall=WALL - age,
        tenant="acme",
        workspace=str(ROOT / "clients" / "acme" / "api"),
        pid=4242,
        exe="/usr/local/bin/claude",
        credential="github",
        method="POST",
        host="api.github.com",
        path=path,
        rule="POST /repos/*/*/issues",
        reason=reason,
    )
    return asyncio.get_running_loop().create_task(app.engine.approvals.wait(approval))
