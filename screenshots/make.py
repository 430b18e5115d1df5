"""Regenerate the dashboard screenshots in this folder from `outloop demo`'s data.

    python screenshots/make.py

Runs the demo headless (its throw-away home, in-memory keyring, loopback API and
scripted agent), drives it with keys as an operator would, and saves SVGs:
overview.svg, approval-pending.svg, alerts.svg, add-credential.svg.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

from textual.widgets import Input  # noqa: E402

from outloop_tui.demo import demo_world, make_demo_app  # noqa: E402

SIZE = (160, 48)


async def until(pilot: object, predicate: Callable[[], object], limit: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("the demo did not reach the expected state")
        await asyncio.sleep(0.1)


async def main() -> None:
    with demo_world() as (world, _upstream):
        app = make_demo_app(world)
        app.agent.pause = 0.8
        async with app.run_test(size=SIZE) as pilot:
            await app.ready.wait()
            app.agent.paste_secret()  # the cross-tenant leak, without waiting for the script
            await until(pilot, lambda: len(app.engine.pending()) >= 2 and app.engine.snapshot().alerts)
            await until(pilot, lambda: app.bridge.audit_seen >= 14)
            app.clear_notifications()
            await pilot.pause(1.2)
            app.save_screenshot("approval-pending.svg", str(HERE))

            await pilot.press("y")
            await pilot.pause(1.5)
            app.clear_notifications()
            await pilot.pause(0.3)
            app.screen.query_one("#audit-log").focus()
            await pilot.pause(0.2)
            app.save_screenshot("overview.svg", str(HERE))

            app.screen.query_one("#alerts").focus()
            await pilot.press("enter")
            await pilot.pause(0.5)
            app.save_screenshot("alerts.svg", str(HERE))

            await pilot.press("escape", "c")
            await pilot.pause(0.5)
            form = app.screen
            for field, value in (
                ("cred-name", "sentry"),
                ("base-url", "https://sentry.io/api/0"),
                ("allow", "GET /api/0/projects/**"),
                ("ask", "PUT /api/0/issues/*"),
                ("deny", "DELETE /**"),
            ):
                form.query_one(f"#{field}", Input).value = value
            secret = form.query_one("#secret", Input)
            secret.focus()
            await pilot.press(*"sntrys_demo_value")
            secret.cursor_blink = False
            await pilot.pause(0.3)
            app.save_screenshot("add-credential.svg", str(HERE))
            await pilot.press("escape")
            app.exit(0)
    for name in ("overview", "approval-pending", "alerts", "add-credential"):
        print(HERE / f"{name}.svg")


if __name__ == "__main__":
    asyncio.run(main())
