"""Package boundaries: broker/ is headless, and the agent's client starts light.

`broker` never imports textual (nor outloop_tui: the dependency goes one way), and
`outloop call` must not pay for textual or httpx2 at start-up.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BROKER = ROOT / "broker"
FORBIDDEN_IN_BROKER = ("textual", "outloop_tui")


def _imported_modules(source: Path) -> list[tuple[int, str]]:
    """Every module a file imports, statically: import, from-import and import_module("...")."""
    tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def _is_forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN_IN_BROKER)


def test_the_static_scan_sees_what_it_looks_for(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        textwrap.dedent("""\
        import os, textual.app
        from textual.widgets import Log
        import importlib
        def f():
            from outloop_tui import cli
            return importlib.import_module("textual")
        """)
    )
    bad = [m for _, m in _imported_modules(sample) if _is_forbidden(m)]
    assert bad == ["textual.app", "textual.widgets", "outloop_tui", "textual"]


def test_broker_sources_never_import_textual_or_the_tui() -> None:
    sources = sorted(BROKER.rglob("*.py"))
    assert BROKER / "config.py" in sources
    offenders = [
        f"{src.relative_to(ROOT)}:{line}: {module}"
        for src in sources
        for line, module in _imported_modules(src)
        if _is_forbidden(module)
    ]
    assert offenders == []


def _run(code: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_importing_every_broker_module_loads_no_textual() -> None:
    result = _run("""\
        import importlib, json, pkgutil, sys
        import broker
        names = sorted(m.name for m in pkgutil.walk_packages(broker.__path__, "broker."))
        for name in names:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules
                        if m.split(".")[0] in ("textual", "outloop_tui"))
        print(json.dumps({"modules": names, "loaded": loaded}))
        """)
    assert "broker.config" in result["modules"]  # type: ignore[operator]
    assert result["loaded"] == []


@pytest.mark.parametrize("module", ["outloop_tui.cli", "outloop_tui.cmd_call"])
def test_the_call_path_loads_neither_textual_nor_httpx2(module: str) -> None:
    result = _run(f"""\
        import json, sys
        import outloop_tui.cli
        import {module}
        outloop_tui.cli.build_parser().parse_args(["call", "github", "GET", "/user"])
        heavy = ("textual", "httpx2", "httpx")
        print(json.dumps({{"loaded": sorted(m for m in sys.modules
                                           if m.split(".")[0] in heavy)}}))
        """)
    assert result["loaded"] == []


def test_call_help_loads_neither_textual_nor_httpx2() -> None:
    result = _run("""\
        import contextlib, io, json, sys
        from outloop_tui.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            try:
                main(["call", "--help"])
            except SystemExit as e:
                assert e.code == 0, e.code
        assert "usage: outloop call" in out.getvalue()
        heavy = ("textual", "httpx2", "httpx")
        print(json.dumps({"loaded": sorted(m for m in sys.modules
                                           if m.split(".")[0] in heavy)}))
        """)
    assert result["loaded"] == []
