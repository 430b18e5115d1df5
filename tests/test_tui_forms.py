"""Tenant management from the dashboard, the first-run flow, the keyring banner, and no
secret on any screen."""

from __future__ import annotations

import asyncio
import html
from collections.abc import Iterator
from typing import Any

import keyring.backends.fail
import pytest
from support import tui_sample
from textual.widgets import Input

from broker.config import load_config
from broker.secrets import SecretStore
from outloop_tui.widgets.alerts import AlertScreen, mask_token, masked_context
from outloop_tui.widgets.first_run import FirstRunScreen
from outloop_tui.widgets.forms import AddCredentialScreen, AddTenantScreen, AddWorkspaceScreen


@pytest.fixture(autouse=True)
def sample_root() -> Iterator[None]:
    with tui_sample.exclusive():  # the sample folder is shared by concurrent test runs
        yield


TYPED_SECRET = "sntrys_TYPEDneverSHOWN42"


def screen_text(app: Any) -> str:
    return html.unescape(app.export_screenshot()).replace("\xa0", " ")


def assert_no_secret(app: Any) -> None:
    text = screen_text(app)
    for value in (*tui_sample.SECRETS.values(), TYPED_SECRET):
        assert value not in text, "a secret reached the screen"


async def until(pilot: Any, predicate: Any, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await pilot.pause(0.03)


async def test_first_run_adds_a_tenant_then_a_workspace(tmp_path: Any) -> None:
    paths = tui_sample.build(tenants=False)
    folder = tmp_path / "clients" / "acme"
    folder.mkdir(parents=True)
    app = tui_sample.make_app(paths, alerts=False)
    async with app.run_test(size=(160, 48)) as pilot:
        await tui_sample.ready(app, audit=False)
        await until(pilot, lambda: isinstance(app.screen, FirstRunScreen))
        await pilot.press("t")
        await until(pilot, lambda: isinstance(app.screen, AddTenantScreen))
        await pilot.press(*"acme", "tab", *"Acme", "enter")
        await until(pilot, lambda: isinstance(app.screen, AddWorkspaceScreen))
        app.screen.query_one("#folder", Input).focus()
        app.screen.query_one("#folder", Input).value = str(folder)
        await pilot.press("enter")
        await until(pilot, lambda: not isinstance(app.screen, AddWorkspaceScreen))
        config = load_config(paths)
        assert config.tenants["acme"].name == "Acme"
        assert config.tenants["acme"].workspaces == (folder.resolve(),)
        await pilot.pause(0.2)
        assert "Acme" in screen_text(app)
        assert app.engine.config.tenants["acme"].workspaces == (folder.resolve(),)


async def test_add_credential_stores_the_typed_secret_in_the_keyring_only() -> None:
    paths = tui_sample.build()
    app = tui_sample.make_app(paths)
    async with app.run_test(size=(160, 48)) as pilot:
        await tui_sample.ready(app)
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, AddCredentialScreen))
        form = app.screen
        await pilot.press(*"sentry")  # the name field has focus; the rest is filled in directly
        for widget_id, text in (
            ("base-url", "https://sentry.io/api/0"),
            ("allow", "GET /projects/**"),
            ("deny", "DELETE /**"),
        ):
            form.query_one(f"#{widget_id}", Input).value = text
        form.query_one("#secret", Input).focus()
        await pilot.press(*TYPED_SECRET)
        assert_no_secret(app)
        await pilot.press("enter")
        await until(pilot, lambda: not isinstance(app.screen, AddCredentialScreen))
        stored = SecretStore().get("acme", "sentry")
        assert stored is not None and stored.reveal() == TYPED_SECRET
        assert TYPED_SECRET not in paths.config_file.read_text()
        cred = load_config(paths).tenants["acme"].credentials["sentry"]
        assert cred.allow == ("GET /projects/**",) and cred.deny == ("DELETE /**",)
        await pilot.pause(0.2)
        assert "sentry" in screen_text(app)
        assert_no_secret(app)


async def test_a_bad_rule_is_refused_in_place_and_the_secret_never_moves() -> None:
    paths = tui_sample.build()
    app = tui_sample.make_app(paths)
    async with app.run_test(size=(160, 48)) as pilot:
        await tui_sample.ready(app)
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, AddCredentialScreen))
        form = app.screen
        form.query_one("#cred-name", Input).value = "sentry"
        form.query_one("#base-url", Input).value = "https://sentry.io"
        form.query_one("#allow", Input).value = "FETCH everything"
        form.query_one("#secret", Input).value = TYPED_SECRET
        await pilot.click("#save")
        await pilot.pause(0.1)
        assert isinstance(app.screen, AddCredentialScreen)
        assert "allow" in screen_text(app)
        assert SecretStore().get("acme", "sentry") is None
        assert "sentry" not in load_config(paths).tenants["acme"].credentials
        assert_no_secret(app)


async def test_no_usable_keyring_shows_a_banner_saying_what_to_install() -> None:
    app = tui_sample.make_app(tui_sample.build(), secrets=SecretStore(keyring.backends.fail.Keyring()))
    async with app.run_test(size=(160, 48)) as pilot:
        await tui_sample.ready(app)
        await pilot.pause(0.1)
        text = screen_text(app)
        assert "No usable keyring" in text and "gnome-keyring" in text


async def test_alert_details_mask_the_secret_in_the_context() -> None:
    app = tui_sample.make_app(tui_sample.build())
    async with app.run_test(size=(160, 48)) as pilot:
        await tui_sample.ready(app)
        app.screen.query_one("#alerts").focus()
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, AlertScreen))
        text = screen_text(app)
        assert "retrying with token ghp_" in text
        assert_no_secret(app)
        await pilot.press("k")  # acknowledge
        await pilot.pause(0.2)
        assert app.acked == {"al-1"}
        await until(pilot, lambda: "critical (seen)" in screen_text(app))  # dimmed, still listed
        await pilot.press("enter")  # the cursor is on it still: open it again and ignore it
        await until(pilot, lambda: isinstance(app.screen, AlertScreen))
        app.screen.query_one("#ignore-reason", Input).value = "test fixture token"
        await pilot.press("i")
        await pilot.pause(0.2)
        assert app.engine.alerts.ignored == [("a" * 64, "test fixture token")]  # type: ignore[attr-defined]
        assert "Leak alerts (1)" in screen_text(app)


def test_masking_keeps_at_most_four_and_two_characters(tmp_path: Any) -> None:
    from outloop_tui.widgets.alerts import AlertView

    value = "sk_live_abcdefghijklmnop1234"
    assert mask_token(value).startswith("sk_l") and mask_token(value).endswith("34")
    assert "abcdefghijklmnop" not in mask_token(value)
    short = "hunter2pw"
    env = tmp_path / ".env"
    import hashlib

    env.write_text(f"A=1\nPASSWORD={short}\nKEY={value}\n")
    view = AlertView(
        "x",
        "high",
        "acme",
        str(tmp_path),
        str(env),
        2,
        "generic",
        "hunt****pw",
        hashlib.sha256(short.encode()).hexdigest(),
        0.0,
    )
    shown = "\n".join(line for _, line in masked_context(view))
    assert short not in shown and value not in shown and "A=1" in shown


async def test_no_secret_on_any_screen() -> None:
    app = tui_sample.make_app(tui_sample.build())
    async with app.run_test(size=(160, 48)) as pilot:
        await tui_sample.ready(app)
        tui_sample.ask(app)
        await pilot.pause(0.2)
        assert_no_secret(app)
        for keys in (
            ["question_mark"],
            ["escape", "c"],
            ["escape", "t"],
            ["escape", "w"],
            ["escape", "q"],
            ["n", "slash"],
        ):
            await pilot.press(*keys)
            await pilot.pause(0.1)
            assert_no_secret(app)


def _highlight(app: Any, kind: str, tenant: str, name: str = "") -> None:
    from outloop_tui.widgets.tenants import NodeRef, TenantsTree

    tree = app.screen.query_one(TenantsTree)
    tree.focus()
    for tenant_node in tree.root.children:
        for node in (tenant_node, *tenant_node.children):
            if node.data == NodeRef(kind, tenant, name):
                tree.move_cursor(node)
                return
    raise AssertionError(f"no node {kind} {tenant} {name}")


async def test_edit_changes_the_rules_and_rotates_the_secret_from_the_dashboard() -> None:
    from outloop_tui.widgets.forms import EditCredentialScreen

    paths = tui_sample.build()
    app = tui_sample.make_app(paths)
    async with app.run_test(size=(160, 48)) as pilot:
        await tui_sample.ready(app)
        _highlight(app, "credential", "acme", "github")
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, EditCredentialScreen))
        form = app.screen
        assert form.query_one("#allow", Input).value == "GET /repos/**"
        form.query_one("#allow", Input).value = "GET /repos/**, GET /user"
        form.query_one("#deny", Input).value = ""
        form.query_one("#secret", Input).value = TYPED_SECRET
        form.query_one("#secret", Input).focus()
        await pilot.press("enter")
        await until(pilot, lambda: not isinstance(app.screen, EditCredentialScreen))
        github = load_config(paths).tenants["acme"].credentials["github"]
        assert [r for r in github.allow] == ["GET /repos/**", "GET /user"]
        assert list(github.ask) == ["POST /repos/*/*/issues"] and not github.deny
        stored = SecretStore().get("acme", "github")
        assert stored is not None and stored.reveal() == TYPED_SECRET
        assert_no_secret(app)


async def test_a_bad_rule_in_the_edit_form_is_named_and_nothing_changes() -> None:
    from outloop_tui.widgets.forms import EditCredentialScreen

    paths = tui_sample.build()
    before = paths.config_file.read_bytes()
    app = tui_sample.make_app(paths)
    async with app.run_test(size=(160, 48)) as pilot:
        await tui_sample.ready(app)
        _highlight(app, "credential", "acme", "github")
        await pilot.press("e")
        await until(pilot, lambda: isinstance(app.screen, EditCredentialScreen))
        app.screen.query_one("#ask", Input).value = "POST repos"
        app.screen.query_one("#ask", Input).focus()
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert isinstance(app.screen, EditCredentialScreen)
        assert "Ask: rule 'POST repos'" in screen_text(app)
    assert paths.config_file.read_bytes() == before


@pytest.mark.parametrize("answer", ["n", "y"])
async def test_remove_asks_first_and_takes_the_secret_only_when_confirmed(answer: str) -> None:
    from outloop_tui.widgets.confirm import ConfirmScreen

    paths = tui_sample.build()
    app = tui_sample.make_app(paths)
    async with app.run_test(size=(160, 48)) as pilot:
        await tui_sample.ready(app)
        _highlight(app, "credential", "globex", "stripe")
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen))
        assert "globex/stripe" in screen_text(app)
        await pilot.press(answer)
        await until(pilot, lambda: not isinstance(app.screen, ConfirmScreen))
        await pilot.pause(0.1)
        present = "stripe" in load_config(paths).tenants["globex"].credentials
        secret = SecretStore().get("globex", "stripe")
        if answer == "n":
            assert present and secret is not None
        else:
            assert not present and secret is None
