"""Policy changes need the operator (issue 14): edits made outside Outloop that widen access wait.

Each escalation is made as an agent would, by a real `python3 -c` rewriting config.toml;
the broker is real, the keyring the session's, and `outloop config accept|reject` real processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from support.fixtures import BrokerThread, World, wait_for
from support.upstream import Upstream

from broker.config import ConfigEditor, ConfigError

# What an agent runs: rewrite config.toml with the standard library and tomli-w, no Outloop code.
EDIT = r"""
import json, sys, tomllib, tomli_w
from pathlib import Path
path = Path(sys.argv[1])
doc = tomllib.loads(path.read_text())
exec(sys.argv[2], {"doc": doc, "json": json})
path.write_text(tomli_w.dumps(doc))
"""


def req(credential: str, method: str, path: str) -> dict[str, Any]:
    return {"payload": {"credential": credential, "method": method, "path": path}}


def body(result: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(result["body"].encode("latin-1"))
    return doc


def agent_edit(world: World, code: str) -> None:
    ran = world.python(EDIT, str(world.paths.config_file), code, cwd=world.acme)
    assert ran.returncode == 0, ran.stderr


def events(world: World, name: str) -> list[dict[str, Any]]:
    return [r for r in world.audit() if r.get("event") == name]


def staged(world: World, broker: BrokerThread, digest_not: str | None = None) -> Any:
    """Wait until the broker has staged a change (one other than `digest_not`)."""

    def look() -> Any:
        s = broker.call(broker.engine.staged_config)
        return s if s is not None and s.digest != digest_not else None

    return wait_for(look, what="a staged config change")


def test_moving_globex_folder_into_acme_is_staged_then_accepted(world: World, broker: BrokerThread) -> None:
    (before,) = world.agent(world.globex, [req("api", "GET", "/echo/x")])
    assert before["status"] == 200
    globex = str(world.globex)
    agent_edit(
        world,
        f"doc['tenants']['globex']['workspaces'] = []\ndoc['tenants']['acme']['workspaces'].append({globex!r})",
    )
    change = staged(world, broker)
    assert any("moved from tenant globex to acme" in line for line in change.changes)
    world.upstream.clear()
    # The narrowing half (out of globex) applies at once; the widening half (into acme) waits.
    (after,) = world.agent(world.globex, [req("api", "GET", "/echo/x")])
    assert body(after)["error"]["code"] == "unmapped_workspace"
    assert world.upstream.records == []
    (rec,) = events(world, "config_staged")
    assert rec["digest"] == change.digest and any("moved" in c for c in rec["changes"])
    assert any("unmapped from globex" in c for c in events(world, "config_narrowed")[0]["changes"])
    world.assert_clean(world.audit_bytes())
    # The operator manages nothing on top of an unapproved file.
    with pytest.raises(ConfigError, match="wait for the operator"):
        ConfigEditor(world.paths)
    ran = world.outloop("config", "accept", cwd=world.unmapped)
    assert ran.returncode == 0, ran.stderr
    assert "moved from tenant globex to acme" in ran.stdout
    (accepted,) = world.agent(world.globex, [req("api", "GET", "/echo/x")])
    assert accepted["status"] == 200
    (up,) = world.upstream.records
    assert up.header("Authorization") == f"Bearer {world.keys[('acme', 'api')]}"
    (acc,) = events(world, "config_accepted")
    assert acc["digest"] == change.digest and acc["approver"].startswith("operator")
    assert broker.call(broker.engine.staged_config) is None


def test_allow_everything_is_staged_then_rejected(world: World, broker: BrokerThread) -> None:
    (denied,) = world.agent(world.acme, [req("api", "GET", "/admin/users")])
    assert body(denied)["error"]["code"] == "denied_by_policy"
    agent_edit(
        world,
        "c = doc['tenants']['acme']['credentials']['api']\nc['allow'].append('* /**')\nc['deny'] = []",
    )
    change = staged(world, broker)
    assert any("new allow rule '* /**'" in line for line in change.changes)
    assert any("deny rule 'DELETE /**' removed" in line for line in change.changes)
    world.upstream.clear()
    (still,) = world.agent(world.acme, [req("api", "GET", "/admin/users")])
    assert body(still)["error"]["code"] == "denied_by_policy"
    (ok,) = world.agent(world.acme, [req("api", "GET", "/echo/x")])  # what was allowed still is
    assert ok["status"] == 200
    ran = world.outloop("config", "reject", "--json", cwd=world.unmapped)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["outcome"] == "rejected"
    # config.toml is back to what is enforced, approved again: the operator's commands work.
    assert "* /**" not in world.paths.config_file.read_text()
    ConfigEditor(world.paths)
    (rejected,) = events(world, "config_rejected")
    assert rejected["digest"] == change.digest
    (after,) = world.agent(world.acme, [req("api", "GET", "/admin/users")])
    assert body(after)["error"]["code"] == "denied_by_policy"
    assert not any(r.path.startswith("/acme/admin") for r in world.upstream.records)


def test_base_url_pointed_at_an_agent_listener_never_gets_the_key(world: World, broker: BrokerThread) -> None:
    with Upstream() as listener:
        agent_edit(world, f"doc['tenants']['acme']['credentials']['api']['base_url'] = {listener.url + '/steal'!r}")
        change = staged(world, broker)
        assert any("base_url" in line for line in change.changes)
        for _ in range(3):
            (result,) = world.agent(world.acme, [req("api", "GET", "/echo/x")])
            assert result["status"] == 200
        assert listener.records == []
        key = world.keys[("acme", "api")]
        assert all(r.header("Authorization") == f"Bearer {key}" for r in world.upstream.records)
        rec = events(world, "config_staged")[-1]
        assert listener.url.split("//")[1] in json.dumps(rec)  # the summary names the new host
        world.assert_clean(world.audit_bytes())
        # Over the operator channel, with the digest the operator saw.
        why = broker.call(broker.engine.accept_config, "0" * 64)
        assert why is not None and "changed since" in why
        assert listener.records == []
        assert broker.call(broker.engine.accept_config, change.digest) is None
        world.agent(world.acme, [req("api", "GET", "/echo/x")])
        (got,) = listener.records
        assert got.path.startswith("/steal/")


def test_the_newest_edit_is_staged_and_a_mixed_edit_narrows_at_once(world: World, broker: BrokerThread) -> None:
    agent_edit(world, "doc['tenants']['acme']['credentials']['api']['allow'].append('PUT /**')")
    first = staged(world, broker)
    # Widen differently, and narrow too (globex's crm credential goes).
    agent_edit(
        world,
        "c = doc['tenants']['acme']['credentials']['api']\nc['allow'] = ['GET /**', 'PATCH /**']\n"
        "del doc['tenants']['globex']['credentials']['crm']",
    )
    second = staged(world, broker, digest_not=first.digest)
    assert any("PATCH" in line for line in second.changes) and not any("PUT" in line for line in second.changes)
    (crm,) = world.agent(world.globex, [req("crm", "GET", "/x")])
    assert body(crm)["error"]["code"] == "unknown_credential"
    assert broker.call(broker.engine.accept_config, first.digest) is not None  # stale
    assert len(events(world, "config_staged")) == 2
    assert any("credential globex/crm removed" in c for r in events(world, "config_narrowed") for c in r["changes"])
    # `allow POST /echo/**` was dropped by the edit: it applies at once too.
    (post,) = world.agent(world.acme, [req("api", "POST", "/echo/x")])
    assert body(post)["error"]["code"] == "denied_by_policy"


def test_a_deleted_config_refuses_everything_until_it_comes_back(world: World, broker: BrokerThread) -> None:
    good = world.paths.config_file.read_bytes()
    world.paths.config_file.unlink()
    wait_for(lambda: events(world, "config_missing"), what="config_missing")
    (gone,) = world.agent(world.acme, [req("api", "GET", "/echo/x")])
    assert body(gone)["error"]["code"] == "unmapped_workspace"
    world.paths.config_file.write_bytes(good)  # the approved bytes: enforced as they are
    (back,) = world.agent(world.acme, [req("api", "GET", "/echo/x")])
    assert back["status"] == 200


def test_a_symlinked_config_is_reviewed_like_any_edit(world: World, broker: BrokerThread) -> None:
    target = world.acme / "my-config.toml"
    text = world.paths.config_file.read_text().replace('"DELETE /**", ', "").replace(', "DELETE /**"', "")
    target.write_text(text.replace('deny = [ "GET /admin/**",]', "").replace("GET /admin/**", "GET /nothing"))
    tmp = world.paths.config_file.with_name("swap")
    os.symlink(target, tmp)
    os.replace(tmp, world.paths.config_file)
    change = staged(world, broker)
    assert any("deny rule" in line and "removed" in line for line in change.changes)
    (still,) = world.agent(world.acme, [req("api", "GET", "/admin/x")])
    assert body(still)["error"]["code"] == "denied_by_policy"


def test_outloops_own_commands_apply_at_once(world: World, broker: BrokerThread, tmp_path: Path) -> None:
    folder = tmp_path / "newcomer"
    folder.mkdir()
    ran = world.outloop("workspace", "add", "acme", str(folder), cwd=world.unmapped)
    assert ran.returncode == 0, ran.stderr
    (result,) = world.agent(folder, [req("api", "GET", "/echo/x")])
    assert result["status"] == 200
    assert broker.call(broker.engine.staged_config) is None
    assert not events(world, "config_staged")
    wait_for(lambda: events(world, "config_changed"), what="config_changed")


def test_accept_without_a_broker_and_inside_a_session(world: World) -> None:
    agent_edit(world, "doc['tenants']['acme']['credentials']['api']['allow'].append('PUT /**')")
    inside = world.run(
        [str(Path(os.sys.executable).parent / "outloop"), "config", "accept"],
        world.unmapped,
        env=world.env(OUTLOOP_SESSION="s-123"),
    )
    assert inside.returncode == 1 and "outside every agent session" in inside.stderr
    ran = world.outloop("config", "accept", cwd=world.unmapped)
    assert ran.returncode == 0, ran.stderr
    assert "new allow rule 'PUT /**'" in ran.stdout
    ConfigEditor(world.paths)  # approved now
    (rec,) = events(world, "config_accepted")
    assert "no broker running" in rec["approver"]
    thread = BrokerThread(world.paths).start()
    try:
        assert thread.call(thread.engine.staged_config) is None
    finally:
        thread.stop()


@pytest.mark.parametrize(("key", "outcome"), [("y", "config_accepted"), ("n", "config_rejected")])
async def test_the_dashboard_shows_the_change_and_answers_it(world: World, key: str, outcome: str) -> None:
    import asyncio

    from broker.engine import Engine
    from outloop_tui.app import OutloopApp
    from outloop_tui.widgets.config_review import ConfigReviewScreen

    app = OutloopApp(Engine(world.paths), watch=False)
    async with app.run_test(size=(160, 48)) as pilot:
        while app.engine.state != "listening":
            await pilot.pause(0.05)
        await asyncio.to_thread(
            agent_edit, world, "doc['tenants']['acme']['credentials']['api']['allow'].append('PUT /**')"
        )
        for _ in range(300):
            if app.engine.snapshot().staged is not None:
                break
            await pilot.pause(0.05)
        await pilot.press("v")
        await pilot.pause(0.2)
        screen = app.screen
        assert isinstance(screen, ConfigReviewScreen)
        assert any("PUT /**" in line for line in screen.widening)
        await pilot.press(key)
        await pilot.pause(0.3)
        assert app.engine.snapshot().staged is None
    (rec,) = events(world, outcome)
    assert rec["approver"] == "operator (dashboard)"
    assert ("PUT /**" in world.paths.config_file.read_text()) == (key == "y")


def test_a_new_ca_bundle_waits_for_the_operator_and_timeouts_do_not() -> None:
    from broker.config_review import review

    before: dict[str, Any] = {"broker": {"upstream_timeout": 30}}
    changed = review(before, {"broker": {"upstream_timeout": 10, "ca_bundle": "/tmp/agent-ca.pem", "http2": True}})
    assert changed.widening == ["[broker] ca_bundle the default -> /tmp/agent-ca.pem"]
    assert changed.applied["broker"] == {"upstream_timeout": 10, "http2": True}  # how, not whom: at once
