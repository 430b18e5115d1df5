"""`outloop call` and `outloop whoami`: the agent's side, on the standard library only."""

from __future__ import annotations

import json
import sys

from broker.client import BrokerUnreachable, Response, call, whoami
from broker.paths import Paths
from outloop_tui.cli import UserError

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: argparse and typing stay out of the call's start
    import argparse
    from typing import Any

EXIT_OK, EXIT_UPSTREAM, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2, 3


def _payload(args: argparse.Namespace) -> dict[str, Any]:
    payload: dict[str, Any] = {"credential": args.credential, "method": args.method.upper(), "path": args.path}
    if args.header:
        headers: dict[str, str] = {}
        for h in args.header:
            name, sep, value = h.partition(":")
            if not sep or not name.strip():
                raise UserError(f"-H takes 'Name: value', not {h!r}", EXIT_REFUSED)
            headers[name.strip()] = value.strip()
        payload["headers"] = headers
    if args.query:
        query: dict[str, list[str]] = {}
        for q in args.query:
            k, sep, v = q.partition("=")
            if not sep:
                raise UserError(f"-q takes k=v, not {q!r}", EXIT_REFUSED)
            query.setdefault(k, []).append(v)
        payload["query"] = query
    if args.data is not None:
        payload["body"] = _read_data(args.data)
    elif args.json_body is not None:
        try:
            payload["body"] = json.loads(_read_data(args.json_body))
        except ValueError:
            raise UserError("--json is not valid JSON", EXIT_REFUSED) from None
    if args.reason:
        payload["reason"] = args.reason
    return payload


def _read_data(value: str) -> str:
    if value == "@-":
        return sys.stdin.read()
    if value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise UserError(f"cannot read {value[1:]}: {e.strerror}", EXIT_REFUSED) from None
    return value


def _socket() -> Any:
    paths = Paths.from_env()
    paths.check_socket_path()
    return paths.socket


def _refusal(resp: Response) -> int:
    try:
        error = resp.json()["error"]
        print(f"outloop: refused ({error['code']}): {error['message']}", file=sys.stderr)
    except (ValueError, KeyError, TypeError):
        print(f"outloop: the broker answered HTTP {resp.status}", file=sys.stderr)
    return EXIT_REFUSED


def run_socket(args: argparse.Namespace) -> int:
    """Print the broker socket's path: where curl --unix-socket and an SDK's uds transport connect."""
    print(_socket())
    return EXIT_OK


def run_call(args: argparse.Namespace) -> int:
    payload = _payload(args)
    try:
        resp = call(_socket(), payload)
    except BrokerUnreachable as e:
        print(f"outloop: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if resp.status != 200:
        return _refusal(resp)
    envelope = resp.json()
    status = int(envelope["status"])
    if args.include:
        print(f"HTTP {status}", file=sys.stderr)
        for k, v in envelope.get("headers", {}).items():
            print(f"{k}: {v}", file=sys.stderr)
        print(f"x-outloop-audit-id: {envelope.get('audit_id')}", file=sys.stderr)
    _print_body(envelope)
    return EXIT_OK if 200 <= status < 300 else EXIT_UPSTREAM


def _print_body(envelope: dict[str, Any]) -> None:
    body = envelope.get("body")
    if body is None:
        return
    if envelope.get("body_base64"):
        import base64

        sys.stdout.buffer.write(base64.b64decode(body))
    elif isinstance(body, str):
        sys.stdout.write(body if body.endswith("\n") else body + "\n")
    else:
        sys.stdout.write(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def run_whoami(args: argparse.Namespace) -> int:
    try:
        resp = whoami(_socket())
    except BrokerUnreachable as e:
        print(f"outloop: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if resp.status != 200:
        return _refusal(resp)
    info = resp.json()
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"tenant      {info['tenant']} ({info.get('name', info['tenant'])})")
    print(f"workspace   {info['workspace']}")
    print(f"socket      {_socket()}")
    creds = info.get("credentials") or []
    print(f"credentials {', '.join(creds) if creds else '(none)'}")
    for name, rules in (info.get("rules") or {}).items():
        print(f"  {name}: {rules.get('base_url')}")
        for kind in ("deny", "allow", "ask"):
            for rule in rules.get(kind, []):
                print(f"    {kind:<5} {rule}")
    return EXIT_OK
