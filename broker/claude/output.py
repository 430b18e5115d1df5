"""What a tool printed: the keys in it, and a copy with them redacted.

One function for the two places that look at a tool's output: the broker's
`POST /v1/scan` (the post hook asks it: the broker already holds the managed
secrets and the compiled rules) and the post hook itself when no broker answers.
Plain functions over plain data (JSON values, the secrets as a mapping).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.claude.encoded import redact_runs, runs
from broker.leaks.redact import Redactor
from broker.leaks.scan import Finding, ManagedSecrets, scan_text


def strings(value: Any) -> list[str]:
    """Every string inside a JSON value (tool responses nest them in objects and lists)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """The same JSON value with `fn` applied to every string in it (keys stay)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [map_strings(v, fn) for v in value]
    return value


def inspect_output(
    response: Any,
    extra: list[str],
    where: Path,
    *,
    tenant: str | None,
    workspace: Path | None,
    managed: ManagedSecrets,
    redactor: Callable[[], Redactor],
) -> tuple[list[Finding], Any] | None:
    """Findings in a tool's response (and in `extra` texts: a large output's file), and
    the response redacted; None when nothing is found.

    Keys are looked for as printed and hex- or base64-decoded. `redactor` is asked for
    only when something was found (building one costs more than a clean scan).
    """
    texts = strings(response) + extra
    if not any(texts):
        return None

    def scan(text: str) -> list[Finding]:
        return scan_text(text, where, tenant=tenant, workspace=workspace, managed=managed)

    findings = [f for text in texts for f in scan(text)]
    findings += [f for text in texts for run in runs(text) for f in scan(run.decoded)]
    if not findings:
        return None
    redact_with = redactor()

    def redact(text: str) -> str:
        return redact_runs(redact_with.text(text), lambda decoded: bool(scan(decoded)))[0]

    return findings, map_strings(response, redact)


def finding_json(f: Finding) -> dict[str, Any]:
    """A finding as the broker sends it to the hook (no part of the secret but the preview)."""
    return {
        "tenant": f.tenant,
        "workspace": str(f.workspace) if f.workspace is not None else None,
        "path": str(f.path),
        "line": f.line,
        "rule": f.rule,
        "severity": f.severity,
        "preview": f.preview,
        "fingerprint": f.fingerprint,
    }


def finding_from_json(d: dict[str, Any]) -> Finding:
    return Finding(
        d.get("tenant"),
        Path(d["workspace"]) if d.get("workspace") else None,
        Path(str(d["path"])),
        int(d["line"]),
        str(d["rule"]),
        d["severity"],
        str(d["preview"]),
        str(d["fingerprint"]),
    )
