"""The alert store: one alert per (file, fingerprint), resolve, ignore, events, crash safety."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from broker.events import AlertIgnored, AlertOpened, AlertResolved, AlertUpdated
from broker.leaks import rules as L
from broker.leaks.alerts import AlertStore
from broker.leaks.scan import scan_text

TOKEN = "npm_" + L.fake(L.A62, 36, "alerts-npm")
OTHER = "glpat-" + L.fake(L.B64URL, 20, "alerts-gl")


def findings(path: Path, text: str):
    return scan_text(text, path, tenant="acme", workspace=path.parent)


def test_lifecycle_open_update_resolve_reopen(tmp_path: Path):
    store = AlertStore(tmp_path / "state" / "alerts.jsonl")
    events = []
    store.subscribe(events.append)
    f = tmp_path / "ws" / ".env"
    store.reconcile_file(f, findings(f, f"A={TOKEN}\nB={TOKEN}\n"))  # same value twice: one alert
    store.reconcile_file(f, findings(f, f"A={TOKEN}\nB={TOKEN}\n"))  # unchanged: no event
    store.reconcile_file(f, findings(f, f"\n\nA={TOKEN}\n"))
    store.reconcile_file(f, findings(f, "A=\n"))
    store.reconcile_file(f, findings(f, f"A={TOKEN}\n"))
    assert [type(e) for e in events] == [AlertOpened, AlertUpdated, AlertResolved, AlertOpened]
    assert [e.alert.line for e in events] == [1, 3, 3, 1]
    assert len({e.alert.id for e in events}) == 1
    [alert] = store.alerts()
    assert alert.status == "open" and alert.tenant == "acme" and alert.path == str(f)


def test_file_is_private_and_holds_no_secret(tmp_path: Path):
    path = tmp_path / "state" / "alerts.jsonl"
    store = AlertStore(path)
    f = tmp_path / ".env"
    store.reconcile_file(f, findings(f, f"A={TOKEN}\n"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert TOKEN not in text and TOKEN[4:-2] not in text
    record = json.loads(text.splitlines()[0])
    assert {
        "id",
        "ts",
        "tenant",
        "workspace",
        "path",
        "line",
        "rule",
        "severity",
        "preview",
        "fingerprint",
        "status",
    } <= set(record)


def test_reload_sees_the_latest_state(tmp_path: Path):
    path = tmp_path / "alerts.jsonl"
    f = tmp_path / "a.py"
    store = AlertStore(path)
    store.reconcile_file(f, findings(f, f"x = '{TOKEN}'\ny = '{OTHER}'\n"))
    store.reconcile_file(f, findings(f, f"y = '{OTHER}'\n"))
    again = AlertStore(path)
    assert sorted((a.rule, a.status) for a in again.alerts(("open", "resolved", "ignored"))) == [
        ("gitlab-glpat", "open"),
        ("npm-access-token", "resolved"),
    ]


def test_torn_last_line_is_skipped_and_appends_continue(tmp_path: Path):
    path = tmp_path / "alerts.jsonl"
    f = tmp_path / ".env"
    AlertStore(path).reconcile_file(f, findings(f, f"A={TOKEN}\n"))
    with path.open("a") as fh:
        fh.write('{"id": "torn", "ts": "2026-')  # crash mid-write
    store = AlertStore(path)
    assert store.skipped_lines == 1 and len(store.alerts()) == 1
    g = tmp_path / "b.env"
    store.reconcile_file(g, findings(g, f"B={OTHER}\n"))
    reloaded = AlertStore(path)
    assert reloaded.skipped_lines == 1 and len(reloaded.alerts()) == 2


def test_ignore_by_fingerprint_applies_now_and_later(tmp_path: Path):
    store = AlertStore(tmp_path / "alerts.jsonl")
    events = []
    store.subscribe(events.append)
    a, b = tmp_path / "a.env", tmp_path / "b.env"
    store.reconcile_file(a, findings(a, f"T={TOKEN}\n"))
    fp = store.alerts()[0].fingerprint
    store.ignore(fp, "test fixture, revoked")
    store.reconcile_file(b, findings(b, f"T={TOKEN}\n"))  # same value elsewhere: stays quiet
    assert [type(e) for e in events] == [AlertOpened, AlertIgnored]
    assert {(a.path, a.status, a.reason) for a in store.alerts()} == {
        (str(a), "ignored", "test fixture, revoked"),
        (str(b), "ignored", "test fixture, revoked"),
    }
    assert store.open_alerts() == []


def test_resolve_path_covers_a_deleted_folder(tmp_path: Path):
    store = AlertStore(tmp_path / "alerts.jsonl")
    inner = tmp_path / "ws" / "sub" / ".env"
    store.reconcile_file(inner, findings(inner, f"T={TOKEN}\n"))
    events = store.resolve_path(tmp_path / "ws" / "sub")
    assert [type(e) for e in events] == [AlertResolved] and store.open_alerts() == []


def test_a_failing_subscriber_does_not_stop_others(tmp_path: Path):
    store = AlertStore(tmp_path / "alerts.jsonl")
    seen = []

    def broken(_event):
        raise RuntimeError("boom")

    store.subscribe(broken)
    unsubscribe = store.subscribe(seen.append)
    f = tmp_path / ".env"
    store.reconcile_file(f, findings(f, f"T={TOKEN}\n"))
    unsubscribe()
    store.reconcile_file(f, findings(f, ""))
    assert [type(e) for e in seen] == [AlertOpened]
